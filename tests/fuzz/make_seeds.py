#!/usr/bin/env python3
"""Writes the fuzz targets' hand-made seeds (tests/fuzz/seeds/TARGET/) from
the real fixtures: request bodies carrying the real AWS, GCP, Azure and TPM
evidence, server and metadata answers, a LUKS2 token, configurations.
tests/fuzz/run.sh adds the fixture files themselves. Run it again when the
wire format changes; the output is committed."""
import base64, hashlib, json, os, shutil

here = os.path.dirname(os.path.abspath(__file__))
fixtures = os.path.join(here, "..", "fixtures", "real")
out = os.path.join(here, "seeds")


def fx(name, mode="r"):
    with open(os.path.join(fixtures, name), mode) as f:
        return f.read()


def b64(data):
    return base64.b64encode(data).decode()


def write(target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)


shutil.rmtree(out, ignore_errors=True)
AWS_VOLUME = "00000000-0000-4000-8000-000000000001"
TPM_VOLUME = "00000000-0000-4000-8000-000000000002"
PENDING_VOLUME = "00000000-0000-4000-8000-000000000003"
client_key = b64(bytes(range(32)))
aws = {"aws": {"rsa2048": fx("aws/ap-southeast-2.rsa2048.b64").strip()}}
gcp = {"gcp": {"identity_token": fx("gcp/rhsm-2021.identity.jwt").strip()}}
azure = {"azure": {"encoding": "pkcs7", "signature": json.loads(fx("azure/regular.attested.json"))["signature"]}}
tpm = {"attest": b64(fx("tpm/gce-cos85-nonce9009.quote-sha256.attest.bin", "rb")),
       "signature": b64(fx("tpm/gce-cos85-nonce9009.quote-sha256.sig.tpmt_signature.bin", "rb")),
       "pcrs": json.loads(fx("tpm/gce-cos85-nonce9009.quote-sha256.pcrs.json")),
       "bank": "sha256",
       "ak_public": b64(fx("tpm/gce-cos85.ak.tpmt_public.bin", "rb"))}

# server_request: first byte 0 unlock, 1 register, 2 confirm, 3 abandon, 4 challenge.
def request(selector, body):
    return bytes([selector]) + json.dumps(body).encode()

attested = {"nonce": "@NONCE@", "client_public_key": client_key}
for name, evidence in (("aws", aws), ("gcp", gcp), ("azure", azure)):
    write("server_request", f"unlock-{name}", request(0, dict(attested, volume_id=AWS_VOLUME, evidence=evidence)))
    write("server_request", f"register-{name}", request(1, dict(attested, evidence=evidence, enrollment_token="kgt_fuzztoken", description="seed")))
write("server_request", "unlock-held", request(0, dict(attested, volume_id="00000000-0000-4000-8000-000000000004", evidence=aws)))
write("server_request", "unlock-held-poll", request(0, dict(attested, volume_id="00000000-0000-4000-8000-000000000004", evidence=aws, approval_request="req-aaaaaaaaaaaa")))
write("server_request", "unlock-counted", request(0, dict(attested, volume_id="00000000-0000-4000-8000-000000000005", evidence=aws)))
write("server_request", "unlock-tpm", request(0, dict(attested, volume_id=TPM_VOLUME, evidence=aws, tpm=tpm)))
write("server_request", "register-tpm", request(1, dict(attested, evidence=aws, tpm=dict(tpm, sealed=False), enrollment_token="kgt_fuzztoken")))
write("server_request", "register-by-attestation", request(1, dict(attested, evidence=gcp)))
proof = b64(bytes(32))
write("server_request", "register-rotates", request(1, dict(attested, evidence=aws, enrollment_token="kgt_fuzztoken", rotates=AWS_VOLUME, rotates_proof=proof)))
write("server_request", "confirm", request(2, {"volume_id": PENDING_VOLUME, "proof": proof}))
write("server_request", "abandon", request(3, {"volume_id": PENDING_VOLUME, "proof": proof}))
write("server_request", "challenge", request(4, {}))

# client_answer: first byte picks the status (0: 200, 1: 400, 2: 403, 4: 409, 5: 429, 6: 500, 8: 202).
envelope = {"alg": "X25519-HKDF-SHA256-A256GCM", "epk": b64(bytes(range(32))), "sealed": b64(bytes(60))}
write("client_answer", "challenge", b"\x00" + json.dumps({"nonce": b64(bytes(32)), "expires_in": 60}).encode())
write("client_answer", "unlock", b"\x00" + json.dumps({"wrapped": envelope}).encode())
write("client_answer", "register", b"\x00" + json.dumps({"volume_id": AWS_VOLUME, "wrapped": envelope, "policy": {"platform": "aws"}}).encode())
write("client_answer", "approval", b"\x08" + json.dumps({"volume_id": AWS_VOLUME, "approval": {
    "request_id": "req-k3v9q2m7xw4d", "state": "pending", "instance": "i-0c5541936caf78c12\u001b[2J",
    "expires_in": 871, "approvals": 0, "approvals_needed": 2, "policy": "payroll", "platform": "aws",
    "claims": {"account_id": "189292791360"}}}).encode())
write("client_answer", "refusal", b"\x02" + json.dumps({"error": {"code": "policy_denied", "message": "instance does not satisfy the volume's policy"}}).encode())
write("client_answer", "busy", b"\x05" + json.dumps({"error": {"code": "rate_limited", "message": "slow down"}}).encode())
write("client_answer", "azure-document", b"\x00" + fx("azure/regular.attested.json", "rb"))
write("client_answer", "gcp-token", b"\x00" + fx("gcp/rhsm-2021.identity.jwt", "rb").strip())
write("client_answer", "aws-signature", b"\x00" + fx("aws/ap-southeast-2.rsa2048.b64", "rb"))
write("client_answer", "headers", b"\x00HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Length: 5\r\n\r\n")

# luks_token: a token as enrollment writes it, with a real certificate pinned.
pem = fx("aws/cert-rsa2048-ap-southeast-2.pem")
der = base64.b64decode("".join(l for l in pem.splitlines() if l and not l.startswith("-----")))
token = {"type": "keygate", "keyslots": ["1"], "keygate_version": 1, "volume_id": AWS_VOLUME,
         "servers": ["https://keys.example:8443", "https://10.0.0.2:8443"], "ca": pem,
         "ca_sha256": hashlib.sha256(der).hexdigest(), "attestation": "aws"}
write("luks_token", "aws", json.dumps(token))
write("luks_token", "tpm", json.dumps(dict(token, tpm={"bank": "sha256", "pcrs": [0, 7], "ak_handle": 0x81000001,
                                                          "sealed": b64(bytes(range(64)))})))

# settings: the shipped example and every key.
write("settings", "example", fx("../../../examples/server.json"))
write("settings", "rules", json.dumps({"enroll_by_attestation": [
    {"platform": "gcp", "require": {"project_id": "p"}},
    {"platform": "azure", "require": {"subscription_id": "s"}, "image_group": True}],
    "tls_san": ["DNS:a", "IP:10.0.0.1"], "nonce_ttl": 30, "evidence_max_age": 600}))

# audit_record: export lines (the chain's encoding, server/audit_chain.h).
def audit_line(seq, time, event, outcome, volume_id, peer, detail, prev):
    def field(b):
        return len(b).to_bytes(8, "big") + b
    enc = field(b"keygate-audit-v1") + seq.to_bytes(8, "big") + time.to_bytes(8, "big", signed=True)
    for f in (event, outcome, volume_id, peer, detail):
        enc += field(f.encode())
    enc += field(prev)
    digest = hashlib.sha256(enc).digest()
    line = json.dumps({"detail": detail, "event": event, "hash": digest.hex(), "outcome": outcome,
                       "peer": peer, "prev": prev.hex(), "seq": seq, "time": time, "volume_id": volume_id},
                      separators=(",", ":"), ensure_ascii=False)
    return line, digest


first, first_hash = audit_line(1, 1764806400, "unlock", "released", "vol-1", "127.0.0.1", "aws 123 i-1", bytes(32))
write("audit_record", "first", first)
second, _ = audit_line(2, 1764806401, "enroll.register", "refused", "", "10.0.0.9",
                       "platform \u00e9\u001b[2J\n quoted \"x\" \\ end", first_hash)
write("audit_record", "escaped", second)
write("audit_record", "head", "1:" + first_hash.hex())

# policy_file: the shipped example, and one with every condition.
write("policy_file", "example", fx("../../../examples/policy.json"))
write("policy_file", "conditions", json.dumps({"policies": {
    "a": {"platform": "aws", "require": {"account_id": "1", "region": ["x", "y"]}, "hours_utc": "22:00-06:00",
          "approval": "automatic"},
    "b": {"platform": "gcp", "require": {"project_id": "p"}, "hours_utc": "00:00-24:00"}}}, indent=1))
