"""Kafka client settings shared by every process: the broker address plus security settings.

Security settings (SASL / TLS) come from the environment, so that secrets stay off command
lines: MLSA4REC_KAFKA_<librdkafka property, dots written as underscores>, for example
    MLSA4REC_KAFKA_SECURITY_PROTOCOL=SASL_SSL
    MLSA4REC_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
    MLSA4REC_KAFKA_SASL_USERNAME=scorer   MLSA4REC_KAFKA_SASL_PASSWORD=...
    MLSA4REC_KAFKA_SSL_CA_LOCATION=/etc/kafka/ca.pem
Every confluent-kafka client (admin, producers, consumers) gets them as they are; the Faust
worker (aiokafka) gets the same as its broker credentials.
"""

from __future__ import annotations

import os
import ssl

PREFIX = "MLSA4REC_KAFKA_"


def security_settings(environ=None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {name[len(PREFIX):].lower().replace("_", "."): value
            for name, value in environ.items() if name.startswith(PREFIX) and value}


def client_config(bootstrap: str, environ=None, **settings) -> dict:
    """A confluent-kafka client configuration: address, security settings, then `settings`
    (keyword names with dots written as underscores)."""
    return {"bootstrap.servers": bootstrap, **security_settings(environ),
            **{k.replace("_", "."): v for k, v in settings.items()}}


def faust_credentials(environ=None):
    """Faust broker_credentials for the same settings, or None for PLAINTEXT."""
    import faust

    s = security_settings(environ)
    protocol = s.get("security.protocol", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if "SSL" in protocol:
        context = ssl.create_default_context(cafile=s.get("ssl.ca.location"))
        if s.get("ssl.certificate.location"):
            context.load_cert_chain(s["ssl.certificate.location"], s.get("ssl.key.location"),
                                    s.get("ssl.key.password"))
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=s.get("sasl.username"),
                                     password=s.get("sasl.password"),
                                     mechanism=s.get("sasl.mechanism", "PLAIN"),
                                     ssl_context=context)
    return faust.SSLCredentials(context)
