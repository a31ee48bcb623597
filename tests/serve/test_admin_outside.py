"""An outside tester's findings on the admin JSON API: the model swap echoed an adapter name of any length, whole, into
its answer and twice into an audit record (`{"adapter": 8 MB}`: 16 MB a record, as often as an admin token asks)."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app


def test_swap_refuses_an_adapter_name_that_is_no_bundle_name_in_one_short_line(home):
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    accounts = Accounts(engine)
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    app = create_app(Settings(), holder=ModelHolder("m"), accounts=accounts)
    h = {"Authorization": f"Bearer {admin}"}
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        log = app.state.trust.log
        for name in ("x" * 200_000, "../../etc/passwd", "a/b", "x\x00", ".hidden", "é"):
            r = c.post("/admin/api/model/swap", json={"adapter": name}, headers=h)
            assert r.status_code == 400 and set(r.json()) == {"error"}, (name[:20], r.status_code, r.text[:200])
            assert "is not a bundle name" in r.json()["error"] and len(r.text) < 400, (name[:20], len(r.text))
        assert list(log.records(kind="update")) == []  # refused at the door: no swap was tried
        r = c.post("/admin/api/model/swap", json={"adapter": "lora-1.2_x"}, headers=h)  # a bundle name: looked up
        assert r.status_code == 400 and "no adapter bundle named 'lora-1.2_x' is installed" in r.json()["error"]
        recs = list(log.records(kind="update"))
        assert [r["route"] for r in recs] == ["update swap_failed"] and recs[0]["detail"]["adapter"] == "lora-1.2_x"
        assert max(len(json.dumps(r)) for r in log.records(limit=1000)) < 5000  # no record holds the long name
        assert log.verify().ok


def test_swap_refuses_a_license_given_with_a_plain_model(home, tmp_path):
    """Was: `{"model": "plain.gguf", "license": "x.lic"}` loaded the plain model and ignored the license, a 200: the
    admin believed a license now governed the served model. Now a 400 that says why, and the model served stays."""
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    accounts = Accounts(engine)
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    plain = tmp_path / "plain.gguf"
    plain.write_bytes(b"GGUF" + bytes(64))
    holder = ModelHolder("m")
    app = create_app(Settings(), holder=holder, accounts=accounts)
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        r = c.post(
            "/admin/api/model/swap",
            json={"model": str(plain), "license": str(tmp_path / "x.lic")},
            headers={"Authorization": f"Bearer {admin}"},
        )
    assert r.status_code == 400 and "plain.gguf is not sealed: a license goes with a sealed model" in r.json()["error"]
    assert holder.model_id == "m" and holder.status.path is None
