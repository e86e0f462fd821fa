"""Keys and certificates of a Flower deployment: TLS for every connection to the SuperLink, registered
SuperNode keys, and the runtime secret between a SuperNode and its ClientApp process.

Files (the names `--certificates DIR` expects, written by `pfl certificates` and by `pfl deploy` into a
private directory it removes at the end):

    ca.crt, ca.key            the certificate authority that signed server.crt (ca.key never leaves the
                              machine that made it; SuperNodes and `flwr` only need ca.crt)
    server.crt, server.key    the SuperLink's certificate (its SANs: the addresses it is reached at, plus
                              127.0.0.1 and localhost, which the SuperLink's own ServerApp process dials)
                              and private key
    node-<i>.key, node-<i>.pub  SuperNode i's P-384 key pair (OpenSSH format, as Flower reads them); the
                              public key is registered with the SuperLink (`flwr supernode register`), the
                              private key stays on node i
    runtime.secret            32 random bytes: the SuperExec secret a SuperNode in process isolation
                              requires of the ClientApp process that acquires its tasks (pfl's warm ClientApp)
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pfl.errors import PflUserError
from pfl.files import atomic_write

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, SECRET = "ca.crt", "ca.key", "server.crt", "server.key", "runtime.secret"
VALID_DAYS = 365


def private_directory(prefix: str = "pfl-keys-") -> Path:
    """A new directory only its owner can enter (mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o700)
    return path


def _write_private(path: Path, data: bytes) -> Path:
    """Replace `path` with `data` in a new file readable by its owner only (created with mode 0600, never
    wider, then renamed into place: pfl.files.atomic_write)."""
    return atomic_write(path, data, mode=0o600)


def _san_entries(addresses: list[str]):
    from cryptography import x509

    entries, seen = [], set()
    for address in [*addresses, "127.0.0.1", "localhost"]:
        if address in seen or address in ("", "0.0.0.0", "::"):
            continue
        seen.add(address)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            entries.append(x509.DNSName(address))
    return entries


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path, addresses: list[str]) -> None:
    """A new CA (ca.crt, ca.key) and a SuperLink certificate it signs (server.crt, server.key) whose SANs are
    `addresses` (IP addresses or host names the SuperNodes dial), 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("pfl deployment CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name("pfl SuperLink")).issuer_name(ca_name)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName(_san_entries(addresses)), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / CA_KEY, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    _write_private(directory / SERVER_KEY, server_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(pem))
    (directory / SERVER_CERT).write_bytes(server_cert.public_bytes(pem))


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair as `<name>.key` (private, mode 0600) and `<name>.pub` (OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    directory.mkdir(parents=True, exist_ok=True)
    private = _write_private(directory / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = directory / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make_secret(path: Path) -> Path:
    """A runtime secret: 32 random bytes (Flower reads the file as raw bytes), mode 0600."""
    return _write_private(path, secrets.token_hex(32).encode())


def certificate_files(directory: Path, option: str = "--certificates") -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) in a user's `directory`, checked to exist and to parse; raises
    PflUserError naming `option` otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    directory = Path(directory).expanduser()
    files = tuple(directory / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY))
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise PflUserError(f"{option}: {str(directory)!r} must hold {CA_CERT}, {SERVER_CERT} and {SERVER_KEY}; "
                           f"missing {', '.join(missing)} (make them with `pfl certificates`)")
    try:
        ca = x509.load_pem_x509_certificate(files[0].read_bytes())
        server = x509.load_pem_x509_certificate(files[1].read_bytes())
        serialization.load_pem_private_key(files[2].read_bytes(), None)
        server.verify_directly_issued_by(ca)
    except Exception as exc:  # any parse or signature failure is the user's files
        raise PflUserError(f"{option}: {CA_CERT}, {SERVER_CERT} and {SERVER_KEY} in {str(directory)!r} must be "
                           f"PEM files, server.crt signed by ca.crt, server.key unencrypted ({exc})") from None
    return files


def certificate_names(server_cert: Path) -> list[str]:
    """The IP addresses and host names a SuperLink certificate is valid for."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def check_node_key(path: Path, option: str = "--key") -> Path:
    """A SuperNode private key as Flower reads it (OpenSSH, an EC key); raises PflUserError otherwise."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = Path(path).expanduser()
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise PflUserError(f"{option}: {str(path)!r} is not a readable OpenSSH private key "
                           f"(make one with `pfl certificates --nodes K`): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PflUserError(f"{option}: {str(path)!r} must be an EC (P-384) key, got {type(key).__name__}")
    return path


@dataclass
class Security:
    """What a deployment's processes are started with. `directory is None`: `--insecure` (plain HTTP, any
    SuperNode accepted); else TLS with the files in `directory` and, with `node_auth`, registered node keys."""

    directory: Path | None = None
    ca: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    secret: Path | None = None
    node_auth: bool = False
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)  # (private, public) per SuperNode

    @property
    def tls(self) -> bool:
        return self.directory is not None

    @classmethod
    def insecure(cls) -> Security:
        return cls()

    @classmethod
    def create(cls, directory: Path, addresses: list[str], supernodes: int,
               certificates: Path | None = None) -> Security:
        """Keys for a deployment in `directory` (a private directory): the user's `certificates` (ca.crt,
        server.crt, server.key) or a throwaway CA and server certificate for `addresses`; one P-384 key pair
        per SuperNode; a runtime secret."""
        if certificates is not None:
            ca, cert, key = certificate_files(certificates)
        else:
            make_certificates(directory, addresses)
            ca, cert, key = (directory / n for n in (CA_CERT, SERVER_CERT, SERVER_KEY))
        nodes = [make_node_key(directory, f"node-{i}") for i in range(supernodes)]
        return cls(directory, ca, cert, key, make_secret(directory / SECRET), True, nodes)

    def superlink_args(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        return ["--ssl-certfile", str(self.server_cert), "--ssl-keyfile", str(self.server_key),
                "--ssl-ca-certfile", str(self.ca), *(["--enable-supernode-auth"] if self.node_auth else [])]

    def supernode_args(self, index: int) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        return ["--root-certificates", str(self.ca),
                *(["--auth-supernode-private-key", str(self.node_keys[index][0])] if self.node_auth else [])]

    def connection_toml(self, name: str, address: str) -> str:
        """The `[superlink.<name>]` entry of flwr's config.toml for this deployment."""
        lines = [f"[superlink.{name}]", f'address = "{address}"']
        lines += [f'root-certificates = "{self.ca}"'] if self.tls else ["insecure = true"]
        return "\n".join(lines) + "\n"
