# CPU scorer worker (and the `mlsa4rec` command line).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md cli.py ./
COPY model model
COPY streams streams
COPY schemas schemas
RUN pip install --no-cache-dir .
ENTRYPOINT ["mlsa4rec"]
CMD ["worker"]
