"""A scripted browser for oidc-provider's own pages (httpx with a cookie jar, redirects followed one
by one): its login form, its consent form and its device pages (code entry, confirmation). Used by
the tests and by demo step 65; needs nothing but httpx."""

from __future__ import annotations

from html.parser import HTMLParser

import httpx


class _Forms(HTMLParser):
    """Every form of a page: id, action, method and its inputs (hidden ones included)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"id": a.get("id"), "action": a.get("action") or "", "fields": {}})
        elif tag == "input" and a.get("name") and self.forms:
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""


def forms(html: str) -> list[dict]:
    p = _Forms()
    p.feed(html)
    return p.forms


def walk(b: httpx.Client, url: str, stop: str, *, user: str = "", user_code: str = "", abort: bool = False) -> str:
    """Follow redirects and submit the provider's forms (login as `user`, consent, a device's user
    code) until a redirect points at `stop`: that URL, not fetched. Returns "" if the walk ends on a
    page with no form (the provider's device success page)."""
    method, data, aborted = "GET", None, False
    for _ in range(20):
        r = b.request(method, url, data=data)
        if r.is_redirect:
            nxt = str(r.url.join(r.headers["location"]))
            if nxt.startswith(stop):
                return nxt
            url, method, data = nxt, "GET", None
            continue
        assert r.status_code == 200, (r.status_code, r.text[:500])
        fs = forms(r.text)
        if not fs or aborted:  # the device success page, or the page after "Abort"
            return ""
        f = fs[0]
        fields = dict(f["fields"])
        if "login" in fields:
            fields.update(login=user, password="any")
        if "user_code" in fields and not fields["user_code"]:
            fields["user_code"] = user_code
        if abort and f["id"] == "op.deviceConfirmForm":
            fields["abort"], aborted = "yes", True
        url, method, data = str(r.url.join(f["action"])), "POST", fields
    raise AssertionError("the provider's pages did not end")
