"""The command groups (`codemoat <noun> <verb>`); each cli module adds its verbs to one of these."""

import typer


def _group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


app = _group("codemoat: a private AI coding service.")
vendor_app = _group("The model vendor's commands: keys, sealing, licenses, update releases, revocations, training.")
license_app = _group("Issue, revoke and list licenses (vendor).")
tokens_app = _group("API tokens: create, list, revoke.")
users_app = _group("Users of this server.")
groups_app = _group("Groups: who may read which repositories.")
index_app = _group("The private code index: add, update, remove, list repositories.")
audit_app = _group("The tamper-evident audit log.")
watermark_app = _group("Output watermarks (vendor).")
config_app = _group("Configuration.")
usage_app = _group("Usage analytics: completions, acceptance, active users.")
directory_app = _group("The company directory (LDAP): mirror users and groups.")
appliance_app = _group("The appliance's hardware (TPM): answer the vendor's attestation challenge, record tamper events.")
vendor_tpm_app = _group("TPM machines: trust manufacturer CAs, prove an attestation key lives beside its certified EK (vendor).")
update_app = _group("Signed updates from the vendor: verify, apply, list, roll back bundles; fetch them from an online channel.")
machine_license_app = _group("This machine's licenses: the vendor's revocation lists (CRLs).")
crl_app = _group("Install and show the vendor's signed revocation list (CRL).")

vendor_app.add_typer(license_app, name="license")
vendor_app.add_typer(vendor_tpm_app, name="tpm")
app.add_typer(vendor_app, name="vendor")
app.add_typer(tokens_app, name="tokens")
app.add_typer(users_app, name="users")
app.add_typer(groups_app, name="groups")
app.add_typer(index_app, name="index")
app.add_typer(audit_app, name="audit")
app.add_typer(watermark_app, name="watermark")
app.add_typer(config_app, name="config")
app.add_typer(usage_app, name="usage")
app.add_typer(directory_app, name="directory")
app.add_typer(update_app, name="update")
app.add_typer(appliance_app, name="appliance")
machine_license_app.add_typer(crl_app, name="crl")
app.add_typer(machine_license_app, name="license")
