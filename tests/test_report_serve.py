"""``labelrefinery serve``: report files only, read-only, and no way out of the root."""

from __future__ import annotations

import http.client
import threading

import pytest

from flows.serve import allowed, make_server, resolve_request

VID = "20260101T000000000Z-abc123"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A dataset root with a report, its metrics, an artifact and files that must stay private."""
    tmp_path = tmp_path_factory.mktemp("served") / "root"
    tmp_path.mkdir()
    (tmp_path / "reports" / "assets").mkdir(parents=True)
    (tmp_path / "reports" / "index.html").write_text("<h1>Reports</h1>")
    (tmp_path / "reports" / "assets" / "style.css").write_text("body {}")
    rep = tmp_path / "versions" / VID / "report"
    rep.mkdir(parents=True)
    (rep / "index.html").write_text("<h1>Overview</h1>")
    (rep.parent / "metrics.json").write_text("{}")
    (rep.parent / "manifest.json").write_text("{}")
    (rep.parent / "sites.parquet").write_bytes(b"PAR1")
    (tmp_path / ".refresh.lock").write_text("pid 1")
    (tmp_path / "data_catalog.yaml").write_text("secret: 1")
    (tmp_path / "versions" / f".draft-{VID}" / "report").mkdir(parents=True)
    (tmp_path / "versions" / f".draft-{VID}" / "report" / "index.html").write_text("draft")
    (tmp_path.parent / "outside.txt").write_text("outside")
    (tmp_path / "reports" / "link.txt").symlink_to(tmp_path.parent / "outside.txt")
    return tmp_path


@pytest.fixture(scope="module")
def server(root):
    srv = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(srv, path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    conn.endheaders()
    resp = conn.getresponse()
    out = resp.status, resp.read(), dict(resp.getheaders())
    conn.close()
    return out


def test_report_files_are_served(server):
    assert server.server_address[0] == "127.0.0.1"
    for path in ("/reports/index.html", f"/versions/{VID}/report/index.html", f"/versions/{VID}/metrics.json",
                 "/reports/assets/style.css", f"/versions/{VID}/report/"):  # fmt: skip
        status, _, headers = _get(server, path)
        assert status == 200, path
        assert "script-src 'none'" in headers["Content-Security-Policy"]
    status, _, headers = _get(server, "/")
    assert status == 302 and headers["Location"] == "/reports/index.html"
    assert _get(server, "/reports/index.html", "HEAD")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/reports/..%2f..%2fdata_catalog.yaml",
        "/reports/..%2Fdata_catalog.yaml",
        "/reports/%2e%2e/data_catalog.yaml",
        "/reports/%2E%2E%2Fdata_catalog.yaml",
        "/reports/../data_catalog.yaml",
        "/..%2fdata_catalog.yaml",
        "/reports/..%5cdata_catalog.yaml",
        "/reports/%252e%252e/data_catalog.yaml",
        "/reports/%c0%ae%c0%ae/data_catalog.yaml",
        "/reports/%00index.html",
        "//etc/passwd",
        "/etc/passwd",
        "/data_catalog.yaml",
        f"/versions/{VID}/sites.parquet",
        f"/versions/{VID}/manifest.json",
        f"/versions/{VID}/report/../sites.parquet",
        f"/versions/{VID}/report/%2e%2e/sites.parquet",
        f"/versions/.draft-{VID}/report/index.html",
        "/.refresh.lock",
        "/reports/assets/",
        "/versions/",
        "/reports/link.txt",
    ],
)
def test_paths_outside_the_reports_are_refused(server, root, path):
    status, body, _ = _get(server, path)
    assert status == 404, path
    assert b"secret" not in body and b"PAR1" not in body and b"outside" not in body


def test_absolute_path_tricks(root):
    assert resolve_request(root, f"//{root}/data_catalog.yaml") is None
    assert resolve_request(root, f"http://127.0.0.1{root}/reports/index.html") is None
    assert (
        resolve_request(root, "http://127.0.0.1/reports/index.html")
        == root.resolve() / "reports" / "index.html"
    )
    assert not allowed(()) and not allowed(("versions", VID)) and allowed(("versions", VID, "metrics.json"))


def test_read_only(server):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert _get(server, "/reports/index.html", method)[0] == 405
