"""A well-formed answer to `POST /auth/device/start`, as `codemoat serve` relays its OpenID provider's: the
`codemoat login` tests start from it, and the hostile ones change one field."""

DEVICE_START = {
    "device_code": "dc",
    "user_code": "ABCD-EFGH",
    "verification_uri": "https://idp.acme.example/device",
    "expires_in": 60,
    "interval": 1,
    "server": "x",
    "issuer": "https://idp.acme.example",
}
