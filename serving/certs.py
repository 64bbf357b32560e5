"""python -m serving.certs DIR: a test CA, a server and a client certificate, and the servers' ssl.config.

For trying TLS and mutual TLS locally (`make certs`), not for production: the keys are unencrypted
and the certificates last 30 days. Written with the `openssl` command:

    DIR/ca.pem, ca.key           the certificate authority that signs both certificates
    DIR/server.pem, server.key   for localhost and 127.0.0.1 (subjectAltName)
    DIR/client.pem, client.key   the client's identity, for servers that verify clients
    DIR/ssl.config               TF Serving's SSLConfig with those PEMs (--ssl_config_file DIR/ssl.config);
                                 client_verify: true, so only clients with a certificate of this CA get in

Then: python -m client predict IMAGE --ca-cert DIR/ca.pem --client-cert DIR/client.pem --client-key DIR/client.key
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

from google.protobuf import text_format

from .configs import SSLConfig

# Small and quick: EC P-256 keys, unencrypted.
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed (apt-get install openssl)")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(out: pathlib.Path, name: str = "ca", days: int = 30) -> None:
    """A self-signed CA: `name`.pem and `name`.key."""
    _openssl("req", "-x509", *_NEW_KEY, "-keyout", str(out / f"{name}.key"), "-out", str(out / f"{name}.pem"),
             "-days", str(days), "-subj", f"/CN={name}")


def make_certificate(out: pathlib.Path, name: str, ca: str = "ca", server: bool = False, days: int = 30) -> None:
    """`name`.pem and `name`.key signed by the CA `ca`; a server certificate names localhost and 127.0.0.1."""
    request = out / f"{name}.csr"
    _openssl("req", *_NEW_KEY, "-keyout", str(out / f"{name}.key"), "-out", str(request), "-subj", f"/CN={name}")
    extensions = []
    if server:
        (out / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        extensions = ["-extfile", str(out / f"{name}.ext")]
    _openssl("x509", "-req", "-in", str(request), "-CA", str(out / f"{ca}.pem"), "-CAkey", str(out / f"{ca}.key"),
             "-CAcreateserial", "-out", str(out / f"{name}.pem"), "-days", str(days), *extensions)
    request.unlink()


def make_test_pki(out: pathlib.Path) -> pathlib.Path:
    """The CA, server and client certificates and ssl.config in `out`; returns ssl.config's path."""
    out.mkdir(parents=True, exist_ok=True)
    make_ca(out)
    make_certificate(out, "server", server=True)
    make_certificate(out, "client")
    ssl = SSLConfig(server_key=(out / "server.key").read_text(), server_cert=(out / "server.pem").read_text(),
                    custom_ca=(out / "ca.pem").read_text(), client_verify=True)
    config = out / "ssl.config"
    config.write_text(text_format.MessageToString(ssl))
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.certs", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="certs", help="folder to write into (default: certs)")
    config = make_test_pki(pathlib.Path(p.parse_args(argv).out))
    print(f"wrote {config.parent}/: ca.pem, server.pem/.key, client.pem/.key and {config.name} "
          f"(serve with --ssl_config_file {config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
