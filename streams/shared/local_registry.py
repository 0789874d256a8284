"""Start and stop a real Confluent-compatible Schema Registry from Python, on a free port:
Apicurio Registry (its app distribution from Maven Central, in-memory storage), whose
Confluent-compatible API is served under /apis/ccompat/v7.

Like the broker (local_broker.py), it needs Java (21 or newer for Apicurio 3.3: the newest
under /usr/lib/jvm, or APICURIO_JAVA) and, once, Maven to download it; no Docker. The download
(~160 MB) is kept under MLSA4REC_CACHE (~/.cache/mlsa4rec). Measured here: ready 7 s after
start, 7 s of CPU, 270 MB resident.

    python -m streams.shared.local_registry      # runs one in the foreground, prints its URL
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from streams.shared.local_broker import free_ports

APICURIO_VERSION = os.environ.get("APICURIO_VERSION", "3.3.3")
ARTIFACT = "io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
CCOMPAT_PATH = "/apis/ccompat/v7"   # what SchemaRegistryClient's url must end with
CACHE = Path(os.environ.get("MLSA4REC_CACHE", Path.home() / ".cache" / "mlsa4rec"))
# C1 only and serial GC, as for the broker: far less CPU at start-up on a small shared machine.
JAVA_OPTS = os.environ.get("APICURIO_JAVA_OPTS",
                           "-Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC")


MIN_JAVA = 21                       # Apicurio 3.3's classes are Java 21 class files


class RegistryUnavailable(RuntimeError):
    """The registry cannot be had here (no Maven, no Java 21+, download refused); tests skip."""


def _java_major(java: str) -> int:
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def find_java() -> str:
    """A java of at least MIN_JAVA: APICURIO_JAVA, else the newest JDK under /usr/lib/jvm,
    else the one on PATH."""
    candidates = [os.environ.get("APICURIO_JAVA", "")]
    candidates += sorted((str(p) for p in Path("/usr/lib/jvm").glob("*/bin/java")),
                         key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True)
    candidates.append(shutil.which("java") or "")
    found = []
    for java in filter(None, candidates):
        major = _java_major(java)
        if major >= MIN_JAVA:
            return java
        found.append(f"{java} ({major or '?'})")
    raise RegistryUnavailable(f"Apicurio Registry {APICURIO_VERSION} needs Java {MIN_JAVA} or newer; "
                              f"found {', '.join(found) or 'none'} (set APICURIO_JAVA)")


def registry_home(version: str = APICURIO_VERSION) -> Path:
    """The unpacked app (with quarkus-run.jar), downloaded with Maven on first use."""
    home = CACHE / f"apicurio-registry-{version}"
    if (home / "quarkus-run.jar").is_file():
        return home
    if shutil.which("mvn") is None:
        raise RegistryUnavailable("mvn not found (needed once to fetch Apicurio Registry)")
    CACHE.mkdir(parents=True, exist_ok=True)
    # Download and unpack in a temporary folder, then rename: an interrupted or concurrent
    # fetch never leaves a half-filled folder that later looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f"apicurio-{version}.", dir=CACHE))
    try:
        done = subprocess.run(["mvn", "-q", "-B", "dependency:copy",
                               f"-Dartifact={ARTIFACT.format(version=version)}",
                               f"-DoutputDirectory={tmp}"],
                              capture_output=True, text=True, timeout=900)
        archives = list(tmp.glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RegistryUnavailable(f"maven could not fetch {ARTIFACT.format(version=version)}: "
                                      f"{(done.stdout + done.stderr).strip()[-500:]}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(tmp / "app", filter="data")
        archives[0].unlink()
        try:
            (tmp / "app").rename(home)
        except OSError:
            pass                        # lost a race: keep the winner's copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (home / "quarkus-run.jar").is_file():
        raise RegistryUnavailable(f"{home} has no quarkus-run.jar after the download")
    return home


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/subjects", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def local_registry(timeout: float = 120.0, log=print) -> Iterator[str]:
    """Yield the URL of a fresh registry ("http://127.0.0.1:port/apis/ccompat/v7", what
    SchemaRegistryClient and --schema-registry-url take); it is stopped on exit. Its schemas
    live in memory only, so each start is empty."""
    java, home = find_java(), registry_home()
    port, management_port = free_ports(2)
    url = f"http://127.0.0.1:{port}{CCOMPAT_PATH}"
    log_file = tempfile.NamedTemporaryFile(prefix="mlsa4rec-registry-", suffix=".log", delete=False)
    args = [java, *JAVA_OPTS.split(), f"-Dquarkus.http.port={port}", "-Dquarkus.http.host=127.0.0.1",
            # Its management interface (health, metrics) would take 0.0.0.0:9000: two registries,
            # or anything else on 9000, would clash.
            f"-Dquarkus.management.port={management_port}", "-Dquarkus.management.host=127.0.0.1",
            "-Dquarkus.otel.enabled=false", "-Dquarkus.log.level=WARN",
            "-jar", str(home / "quarkus-run.jar")]
    t0 = time.monotonic()
    process = subprocess.Popen(args, cwd=home, stdin=subprocess.DEVNULL, stdout=log_file,
                               stderr=subprocess.STDOUT)
    try:
        while not _answers(url):        # ready = the Confluent API answers, not a port open
            if process.poll() is not None:
                raise RuntimeError(f"the registry exited during start-up (code {process.returncode}):\n"
                                   + _tail(log_file.name))
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the registry did not answer within {timeout:.0f} s:\n"
                                   + _tail(log_file.name))
            time.sleep(0.2)
        log(f"[local_registry] Apicurio Registry {APICURIO_VERSION} on {url} "
            f"ready in {time.monotonic() - t0:.1f}s (log {log_file.name})")
        yield url
    finally:
        process.terminate()             # Quarkus shuts down cleanly on SIGTERM
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log_file.close()


def _tail(path: str, chars: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-chars:]


if __name__ == "__main__":
    with local_registry() as registry_url:
        print(registry_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
