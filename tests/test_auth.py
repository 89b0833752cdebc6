"""Authentication and transport security: bearer tokens with roles, TLS and mutual
TLS, secure-by-default start-up. Unit tests for the token table and the rules;
integration tests against real servers through the client and the CLI."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tlserve.client as tlclient
from tlserve.client import TLS
from tlserve.client.cli import main as cli_main
from tlserve.client.inference import grpc_service_pb2 as kpb
from tlserve.client.inference import grpc_service_pb2_grpc as kgrpc
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import auth
from tlserve.service.api.auth import REQUIRED_ROLE, required_role
from tlserve.service.auth import Principal, Role, TokenTable, parse_tokens
from tlserve.service.config import Settings, is_loopback
from tlserve.service.errors import ConfigError
from tests.pki import make_pki
from tests.serverproc import ServerProcess

ADMIN, PREDICT, READER = ("admin-" + "a" * 30, "predict-" + "p" * 30, "reader-" + "r" * 30)


def tokens_text(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# -- the token table ------------------------------------------------------------------


def test_tokens_file_lines_give_principals_and_keep_only_digests():
    entries = parse_tokens(tokens_text(
        "# name roles secret",
        f"ops admin {ADMIN}",
        f"web predict,read sha256:{auth.digest(PREDICT).hex()}   # hashed",
        "",
    ))
    assert [p for _, p in entries] == [Principal("ops", frozenset({Role.ADMIN})),
                                       Principal("web", frozenset({Role.PREDICT, Role.READ}))]
    assert all(isinstance(d, bytes) and len(d) == 32 for d, _ in entries)
    assert ADMIN.encode() not in b"".join(d for d, _ in entries)


@pytest.mark.parametrize("line, says", [
    ("ops admin", "expected NAME ROLES SECRET"),
    (f"ops root {ADMIN}", "roles 'root'"),
    ("ops admin short-token", "at least 24 printable characters"),
    ("ops admin sha256:abc", "64 hex digits"),
    (f"o/ps admin {ADMIN}", "name 'o/ps'"),
    (f"ops admin {ADMIN}\nops read {READER}", "appears twice"),
    (f"ops admin {ADMIN}\nweb read {ADMIN}", "another name's token"),
    ("# only a comment", "holds no token"),
])
def test_a_bad_tokens_file_is_refused_with_its_line(line, says):
    with pytest.raises(ConfigError, match=says):
        parse_tokens(line)


def test_roles_imply_what_they_should_and_no_more():
    admin, predict = Principal("a", frozenset({Role.ADMIN})), Principal("p", frozenset({Role.PREDICT}))
    read, metrics = Principal("r", frozenset({Role.READ})), Principal("m", frozenset({Role.METRICS}))
    assert all(admin.allows(role) for role in Role)
    assert predict.allows(Role.READ) and not predict.allows(Role.ADMIN) and not predict.allows(Role.METRICS)
    assert read.allows(Role.READ) and not read.allows(Role.PREDICT)
    assert metrics.allows(Role.METRICS) and not metrics.allows(Role.READ)


def test_authenticate_finds_the_token_and_nothing_else(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(tokens_text(f"ops admin {ADMIN}", f"web predict sha256:{auth.digest(PREDICT).hex()}"))
    table = TokenTable.load(path)
    assert table.authenticate(ADMIN).name == "ops" and table.authenticate(PREDICT).name == "web"
    assert table.authenticate(READER) is None and table.authenticate("") is None
    assert table.authenticate(ADMIN[:-1]) is None


def test_reload_takes_a_good_file_and_keeps_the_old_tokens_on_a_bad_one(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(tokens_text(f"ops admin {ADMIN}"))
    table = TokenTable.load(path)
    path.write_text(tokens_text(f"web read {READER}"))
    assert table.reload() and table.authenticate(READER) and table.authenticate(ADMIN) is None
    path.write_text("web read tooshort\n")
    assert not table.reload() and table.authenticate(READER).name == "web"
    path.unlink()
    assert not table.reload() and table.authenticate(READER).name == "web"


def test_bearer_header_parsing():
    assert auth.bearer_token("Bearer abc") == "abc" and auth.bearer_token("bearer  abc ") == "abc"
    assert auth.bearer_token("Basic abc") is None and auth.bearer_token("Bearer ") is None


def test_token_maker_prints_a_token_and_a_line_the_server_reads(capsys):
    assert auth.main(["web", "predict,read"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].removeprefix("token: ")
    line = out[1].removeprefix("tokens file line: ")
    assert token not in line
    [(stored, principal)] = parse_tokens(line)
    assert stored == auth.digest(token) and principal.roles == {Role.PREDICT, Role.READ}
    assert auth.main(["web", "root"]) == 2


# -- which role each call needs ----------------------------------------------------------


def test_every_rpc_of_the_api_has_a_role_decided_on_purpose():
    methods = [f"tlserve.v1.TLServe/{m.name}" for m in pb.DESCRIPTOR.services_by_name["TLServe"].methods]
    methods += [f"inference.GRPCInferenceService/{m.name}"
                for m in kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
    assert sorted(methods) == sorted(REQUIRED_ROLE)
    assert required_role("/tlserve.v1.TLServe/Predict") is Role.PREDICT
    assert required_role("/tlserve.v1.TLServe/DeleteModel") is Role.ADMIN
    assert required_role("/tlserve.v1.TLServe/NotYetInvented") is Role.ADMIN  # closed until decided
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


# -- settings: secure by default -----------------------------------------------------------


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:1", True), ("127.8.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
    ("0.0.0.0:1", False), ("[::]:1", False), ("10.0.0.5:1", False), ("tlserve.example:1", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


def test_a_public_bind_without_tokens_is_refused_unless_insecure(tmp_path):
    public = ["--grpc-address", "0.0.0.0:0"]
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0:0 without authentication"):
        Settings.parse(public, {})
    assert Settings.parse([*public, "--insecure"], {}).insecure is True
    assert Settings.parse(public, {"TLSERVE_INSECURE": "1"}).insecure is True
    with pytest.raises(ConfigError, match="TLSERVE_INSECURE: must be true or false"):
        Settings.parse(public, {"TLSERVE_INSECURE": "maybe"})
    assert Settings.parse([*public, "--auth-tokens-file", str(tmp_path / "t")], {}).auth_tokens_file is not None
    assert Settings.parse([], {}).insecure is False  # the loopback default needs nothing


@pytest.mark.parametrize("flags, says", [
    (["--tls-cert-file", "c.pem"], "go together"),
    (["--tls-key-file", "k.pem"], "go together"),
    (["--tls-client-ca-file", "ca.pem"], "--tls-client-ca-file needs --tls-cert-file"),
    (["--metrics-tls"], "--metrics-tls needs --tls-cert-file"),
])
def test_half_a_tls_setup_is_refused(flags, says):
    with pytest.raises(ConfigError, match=says):
        Settings.parse(flags, {})


def test_the_server_refuses_a_public_bind_without_tokens_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tlserve.service", "--home", str(tmp_path), "--grpc-address", "0.0.0.0:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tlserve: error: refusing to listen on 0.0.0.0:0 without authentication: give --auth-tokens-file "
        "(TLSERVE_AUTH_TOKENS_FILE), or --insecure (TLSERVE_INSECURE=1) to let anyone who reaches the port call "
        "every RPC"]


def test_an_unreadable_or_bad_tokens_file_stops_the_start_in_one_line(tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text("ops admin short\n")
    for path, says in ((tmp_path / "missing", "cannot read the tokens file"), (bad, "line 1: the token of 'ops'")):
        done = subprocess.run([sys.executable, "-m", "tlserve.service", "--home", str(tmp_path / "home"),
                               "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
                               "--auth-tokens-file", str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- a server with tokens --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(tokens_text(f"ops admin {ADMIN}", f"web predict sha256:{auth.digest(PREDICT).hex()}",
                                f"dash read {READER}"))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokens_file):
    proc = ServerProcess(tmp_path_factory.mktemp("authserver") / "home", "--auth-tokens-file", str(tokens_file))
    proc.start()
    yield proc
    assert proc.terminate() == 0, proc.log()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(tlclient.TLServeError) as e:
        call()
    return e.value.code


def test_calls_without_a_known_token_are_unauthenticated(server):
    with tlclient.Client(server.address, timeout=10) as anonymous, \
            tlclient.Client(server.address, timeout=10, token="x" * 40) as stranger:
        for c in (anonymous, stranger):
            with pytest.raises(tlclient.TLServeError) as e:
                c.list_datasets()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(tlclient.TLServeError, match="needs a bearer token"):
            anonymous.get_server_info()
        with pytest.raises(tlclient.TLServeError, match="not one this server accepts"):
            stranger.get_server_info()
        # Health stays open: load balancers and probes carry no token.
        assert anonymous.health() == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/tlserve.v1.TLServe/ListModels")(b"", metadata=(("authorization", "Basic Zm9v"),),
                                                                  timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_each_role_reaches_its_calls_and_is_denied_the_rest(server):
    with tlclient.Client(server.address, timeout=10, token=READER) as reader, \
            tlclient.Client(server.address, timeout=10, token=PREDICT) as predictor, \
            tlclient.Client(server.address, timeout=10, token=ADMIN) as admin:
        for c in (reader, predictor, admin):
            assert c.list_datasets().datasets == [] and c.get_server_info().version
        # read: no predictions, nothing that changes state.
        with pytest.raises(tlclient.TLServeError, match="Predict needs the predict role; the token 'dash' has read"):
            reader.predict("nope", [b"x"])
        assert code_of(lambda: reader.delete_dataset("nope")) == grpc.StatusCode.PERMISSION_DENIED
        # predict: the call gets through to the service (which has no such model).
        assert code_of(lambda: predictor.predict("nope", [b"x"])) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: predictor.delete_model("nope:1")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: predictor.fine_tune(dataset="d", model_name="m", backbone="resnet18")) == \
            grpc.StatusCode.PERMISSION_DENIED
        # admin: everything reaches the service.
        assert code_of(lambda: admin.delete_dataset("nope")) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: admin.predict("nope", [b"x"])) == grpc.StatusCode.NOT_FOUND


def test_kserve_inference_needs_the_predict_role(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)

        def as_(token):
            return (("authorization", f"Bearer {token}"),)

        assert stub.ServerLive(kpb.ServerLiveRequest(), metadata=as_(READER), timeout=10).live
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED), (as_(READER), grpc.StatusCode.PERMISSION_DENIED),
                               (as_(PREDICT), grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(kpb.ModelInferRequest(model_name="nope"), metadata=metadata, timeout=10)
            assert e.value.code() == code, metadata
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_refused_calls_are_counted_by_code(server):
    with tlclient.Client(server.address, timeout=10) as anonymous:
        code_of(anonymous.list_models)
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'method="tlserve.v1.TLServe/ListModels"' in text and 'code="UNAUTHENTICATED"' in text


def test_the_cli_takes_a_token_by_flag_or_environment(server, capsys, monkeypatch):
    monkeypatch.delenv("TLSERVE_TOKEN", raising=False)
    assert cli_main(["--address", server.address, "--token", READER, "--json", "datasets"]) == 0
    capsys.readouterr()
    assert cli_main(["--address", server.address, "datasets"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("TLSERVE_TOKEN", READER)
    assert cli_main(["--address", server.address, "datasets", "delete", "nope"]) == 1
    assert "PERMISSION_DENIED: DeleteDataset needs the admin role" in capsys.readouterr().err


def test_sighup_rereads_the_tokens_file_and_a_broken_one_changes_nothing(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(tokens_text(f"ops admin {ADMIN}"))
    proc = ServerProcess(tmp_path / "home", "--auth-tokens-file", str(path)).start()
    try:
        with tlclient.Client(proc.address, timeout=10, token=ADMIN) as old, \
                tlclient.Client(proc.address, timeout=10, token=READER) as new:
            assert old.list_models().models == []
            path.write_text(tokens_text(f"dash read {READER}"))
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    new.list_models()
                    break
                except tlclient.TLServeError:
                    time.sleep(0.1)
            assert new.list_models().models == []
            assert code_of(old.list_models) == grpc.StatusCode.UNAUTHENTICATED  # rotated out
            path.write_text("dash read short\n")  # a typo: the tokens in force stay
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while "tokens file not reloaded" not in proc.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "tokens file not reloaded" in proc.log()
            assert new.list_models().models == []
    finally:
        assert proc.terminate() == 0, proc.log()


# -- TLS and mutual TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki, tokens_file):
    proc = ServerProcess(
        tmp_path_factory.mktemp("mtls") / "home", "--auth-tokens-file", str(tokens_file),
        "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
        "--tls-client-ca-file", str(pki.ca), "--metrics-tls",
    )
    proc.start()
    yield proc
    assert proc.terminate() == 0, proc.log()


def test_mutual_tls_with_a_token_works_through_the_client(mtls_server, pki):
    tls = TLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    with tlclient.Client(mtls_server.address, timeout=10, token=READER, tls=tls) as c:
        assert c.list_datasets().datasets == []
        assert code_of(lambda: c.delete_dataset("x")) == grpc.StatusCode.PERMISSION_DENIED
        # Over TLS the token rides as call credentials, not as caller metadata.
        assert all(key != "authorization" for key, _ in c.metadata)
    with tlclient.Client(mtls_server.address, timeout=10, tls=tls) as no_token:
        assert code_of(no_token.list_datasets) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "certificate from another CA", "unknown CA"])
def test_mutual_tls_turns_away_clients_it_cannot_verify(mtls_server, pki, who):
    tls = {
        "plaintext": None,
        "no client certificate": TLS(ca_file=pki.ca),
        "certificate from another CA": TLS(ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key),
        "unknown CA": TLS(ca_file=pki.rogue_cert, cert_file=pki.client_cert, key_file=pki.client_key),
    }[who]
    with tlclient.Client(mtls_server.address, timeout=5, token=ADMIN, tls=tls) as c:
        assert code_of(c.get_server_info) == grpc.StatusCode.UNAVAILABLE


def test_the_cli_speaks_mutual_tls(mtls_server, pki, capsys):
    base = ["--address", mtls_server.address, "--token", READER, "--ca-file", str(pki.ca)]
    assert cli_main([*base, "--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key), "info"]) == 0
    capsys.readouterr()
    assert cli_main([*base, "--cert-file", str(pki.client_cert), "info"]) == 1
    assert "give both or neither" in capsys.readouterr().err


def test_the_metrics_endpoint_serves_https_to_verified_clients_only(mtls_server, pki):
    url = f"https://{mtls_server.metrics_address}/metrics"
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        assert b"tlserve_build_info" in response.read()
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context(cafile=str(pki.ca))).read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{mtls_server.metrics_address}/metrics", timeout=10).read()
    with urllib.request.urlopen(url, timeout=10, context=context) as response:  # still serving
        assert b"tlserve_build_info" in response.read()


def test_server_side_tls_alone_with_the_async_client(tmp_path, pki, tokens_file):
    import asyncio

    proc = ServerProcess(tmp_path / "home", "--auth-tokens-file", str(tokens_file),
                         "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)).start()
    try:
        async def call() -> int:
            async with tlclient.AsyncClient(proc.address, timeout=10, token=PREDICT, tls=TLS(ca_file=pki.ca)) as c:
                return len((await c.list_models()).models)

        assert asyncio.run(call()) == 0
        with tlclient.Client(proc.address, timeout=5, token=PREDICT) as plaintext:
            assert code_of(plaintext.list_models) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert proc.terminate() == 0, proc.log()


def test_no_private_key_or_token_lands_in_the_log(mtls_server, server):
    for proc in (mtls_server, server):
        log = proc.log()
        assert ADMIN not in log and READER not in log and "PRIVATE KEY" not in log


def test_metrics_auth_asks_scrapers_for_a_token_with_the_metrics_role(tmp_path):
    path = tmp_path / "tokens"
    scraper = "scraper-" + "s" * 30
    path.write_text(tokens_text(f"ops admin {ADMIN}", f"prom metrics {scraper}", f"dash read {READER}"))
    proc = ServerProcess(tmp_path / "home", "--auth-tokens-file", str(path), "--metrics-auth").start()
    try:
        url = f"http://{proc.metrics_address}/metrics"

        def scrape(token: str | None) -> int:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert b"tlserve_build_info" in response.read()
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert [scrape(t) for t in (None, "x" * 30, READER, scraper, ADMIN)] == [401, 401, 403, 200, 200]
    finally:
        assert proc.terminate() == 0, proc.log()


def test_metrics_auth_without_a_tokens_file_is_refused():
    with pytest.raises(ConfigError, match="--metrics-auth needs --auth-tokens-file"):
        Settings.parse(["--metrics-auth"], {})


def test_a_client_that_never_finishes_its_handshake_does_not_stop_the_metrics_endpoint(mtls_server, pki):
    import socket

    host, port = mtls_server.metrics_address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)), timeout=10)  # connects, never speaks TLS
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        url = f"https://{mtls_server.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            assert b"tlserve_build_info" in response.read()
    finally:
        silent.close()
