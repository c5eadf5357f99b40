"""cc_keygate with Debian's real cloud-init package: schema validation of the
examples, and handle() against volume files, the real keygate binary, a real
keygate-server over TLS and the metadata emulator. Only what needs
device-mapper (opening a mapping, making a file system inside it, mounting
it) is stood in for: the volume is checked with keygate's verify-only unlock
instead, and the QEMU test (tests/e2e/cloudinit_test.sh) does the real thing.

Run by ctest (tests/CMakeLists.txt) with KEYGATE_BIN_DIR set.
"""

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import yaml

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(SOURCE, "cloudinit"))

import cc_keygate  # noqa: E402

BIN = os.environ.get("KEYGATE_BIN_DIR", os.path.join(SOURCE, "build", "bin"))
# KEYGATE_UNLOCKER: another keygate binary to test (the static release build).
KEYGATE = os.environ.get("KEYGATE_UNLOCKER") or os.path.join(BIN, "keygate")
EXAMPLES = sorted(glob.glob(os.path.join(SOURCE, "examples", "cloud-init", "*.yaml")))


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class TestSystem(cc_keygate.System):
    """The module's System with a test root, and the device-mapper steps
    replaced: 'open' proves the released key opens the keyslot (verify-only),
    'mkfs' and 'mount' are recorded."""

    root = None
    opened = set()
    filesystems = {}
    mounted = set()
    initramfs_refreshed = 0
    network_unlock_enabled = False
    unlock_args = []

    def __init__(self):
        super().__init__()
        self.keygate = KEYGATE

    def is_open(self, name):
        return name in TestSystem.opened

    def open_volume(self, device, name, common):
        self.run([self.keygate, "unlock", device, "--verify-only"] + TestSystem.unlock_args + common,
                 "open", device)
        TestSystem.opened.add(name)

    def signature(self, device):
        if device.startswith("/dev/mapper/"):
            return TestSystem.filesystems.get(device[len("/dev/mapper/"):])
        return super().signature(device)

    def make_filesystem(self, device, name, fs):
        TestSystem.filesystems[name] = fs

    def is_mounted(self, mountpoint):
        return mountpoint in TestSystem.mounted

    def mount(self, device, name, mountpoint):
        os.makedirs(self.path(mountpoint), exist_ok=True)
        TestSystem.mounted.add(mountpoint)

    def update_initramfs(self, device):
        TestSystem.initramfs_refreshed += 1

    def enable_network_unlock(self, device):
        TestSystem.network_unlock_enabled = True


class CloudInitModuleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="keygate-cloudinit-")
        cls.procs = []
        subprocess.run([os.path.join(BIN, "keygate-metadata-emulator"), "init", "--state-dir",
                        cls.dir + "/emu"], check=True, capture_output=True)
        cls.emu_port = cls.start([os.path.join(BIN, "keygate-metadata-emulator"), "serve",
                                  "--state-dir", cls.dir + "/emu", "--listen", "127.0.0.1:0"],
                                 "emu")
        cls.srv_port = cls.start([os.path.join(BIN, "keygate-server"), "serve", "--state-dir",
                                  cls.dir + "/server", "--listen", "127.0.0.1:0",
                                  "--aws-trust-dir", cls.dir + "/emu/aws-trust"], "server")
        with open(cls.dir + "/server/ca.pem", encoding="utf-8") as f:
            cls.ca = f.read()

    @classmethod
    def start(cls, argv, name):
        port_file = os.path.join(cls.dir, name + ".port")
        with open(os.path.join(cls.dir, name + ".log"), "w") as log:
            proc = subprocess.Popen(argv + ["--port-file", port_file], stdout=log, stderr=log)
        cls.procs.append(proc)
        for _ in range(200):
            if os.path.exists(port_file):
                with open(port_file, encoding="utf-8") as f:
                    text = f.read()
                if text.endswith("\n"):
                    return int(text)
            time.sleep(0.05)
        raise RuntimeError("%s did not start" % name)

    @classmethod
    def tearDownClass(cls):
        for p in cls.procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        shutil.rmtree(cls.dir, ignore_errors=True)

    def setUp(self):
        self.root = tempfile.mkdtemp(dir=self.dir, prefix="root-")
        os.makedirs(self.root + "/etc")
        with open(self.root + "/etc/fstab", "w") as f:
            f.write("# /etc/fstab\nUUID=1234 / ext4 defaults 0 1\n")
        TestSystem.root = self.root
        TestSystem.opened, TestSystem.filesystems, TestSystem.mounted = set(), {}, set()
        TestSystem.initramfs_refreshed = 0
        TestSystem.network_unlock_enabled = False
        TestSystem.unlock_args = ["--metadata-url", self.metadata_url()]
        self.saved_system = cc_keygate.System
        cc_keygate.System = TestSystem

    def tearDown(self):
        cc_keygate.System = self.saved_system

    def metadata_url(self):
        return "http://127.0.0.1:%d" % self.emu_port

    def server(self, *args):
        out = subprocess.run([os.path.join(BIN, "keygate-server")] + list(args) +
                             ["--state-dir", self.dir + "/server"],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def token(self, *args):
        return self.server("token", "create", "--uses", "10", *args).strip()

    def volume_file(self, name, size="32M"):
        path = os.path.join(self.root, name + ".img")
        subprocess.run(["truncate", "-s", size, path], check=True)
        return path

    def config(self, volumes, **extra):
        cfg = {"keygate": {"servers": ["https://127.0.0.1:%d" % self.srv_port], "ca": self.ca,
                           "enrollment_token": self.token(), "metadata_url": self.metadata_url(),
                           "volumes": volumes}}
        cfg["keygate"].update(extra)
        return cfg

    def handle(self, cfg):
        cc_keygate.handle("keygate", cfg, None, logging.getLogger("test"), [])

    def status(self, device):
        out = subprocess.run([KEYGATE, "status", device, "--json"],
                             capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def read(self, path):
        with open(self.root + path, encoding="utf-8") as f:
            return f.read()

    def uuid(self, device):
        return subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", device],
                              capture_output=True, text=True).stdout.strip()

    # --- schema ------------------------------------------------------------

    def test_examples_are_valid_cloud_config_and_valid_keygate_config(self):
        self.assertGreaterEqual(len(EXAMPLES), 3)
        for path in EXAMPLES:
            ci = subprocess.run(["cloud-init", "schema", "--config-file", path],
                                capture_output=True, text=True)
            self.assertEqual(ci.returncode, 0, path + ": " + ci.stdout + ci.stderr)
            self.assertIn("Valid cloud-config", ci.stdout)
            with open(path, encoding="utf-8") as f:
                cc_keygate.validate(yaml.safe_load(f))
            cmd = subprocess.run([sys.executable, os.path.join(SOURCE, "cloudinit", "cc_keygate.py"),
                                  "validate", path], capture_output=True, text=True)
            self.assertEqual(cmd.returncode, 0, cmd.stdout)

    def test_broken_configs_are_rejected_naming_the_key(self):
        with open(EXAMPLES[0], encoding="utf-8") as f:
            good = yaml.safe_load(f)
        cc_keygate.validate(good)
        cases = [
            ("keygate.servers.0", lambda k: k.update(servers=["http://plain"])),
            ("keygate", lambda k: k.pop("servers")),
            ("keygate.volumes.0.mode", lambda k: k["volumes"][0].update(mode="shred")),
            ("keygate.volumes.0", lambda k: k["volumes"][0].update(colour="red")),
            ("keygate.volumes.0.device", lambda k: k["volumes"][0].update(device="sdb")),
            ("keygate.volumes.0.name", lambda k: k["volumes"][0].update(name="a b")),
            ("keygate.tpm", lambda k: k.update(tpm="maybe")),
            ("keygate.volumes.1.name", lambda k: k["volumes"].append(dict(k["volumes"][0], device="/dev/sdz"))),
            ("keygate.volumes.0.passphrase_file", lambda k: k["volumes"][0].update(mode="enroll-existing")),
            ("keygate.enrollment_token", lambda k: k.update(enrollment_token_file="/run/t")),
            ("keygate.enrollment_token", lambda k: k.update(enrollment_token="not a token!")),
            ("keygate.root", lambda k: k.update(root={"rotate": True})),
        ]
        for key, breaker in cases:
            cfg = json.loads(json.dumps(good))
            breaker(cfg["keygate"])
            with self.assertRaises(cc_keygate.ConfigError, msg=key) as caught:
                cc_keygate.validate(cfg)
            self.assertIn(key, str(caught.exception))
        bad = os.path.join(self.root, "bad.yaml")
        with open(bad, "w") as f:
            f.write("#cloud-config\nkeygate:\n  servers: []\n")
        cmd = subprocess.run([sys.executable, os.path.join(SOURCE, "cloudinit", "cc_keygate.py"),
                              "validate", bad], capture_output=True, text=True)
        self.assertEqual(cmd.returncode, 1)
        self.assertIn("keygate", cmd.stdout)

    # --- handle() ----------------------------------------------------------

    def test_format_enroll_tables_and_a_second_run_that_changes_nothing(self):
        data, logs = self.volume_file("data"), self.volume_file("logs")
        cfg = self.config([
            {"device": data, "name": "data", "mode": "format", "filesystem": "ext4",
             "mount": "/data"},
            {"device": logs, "name": "logs", "filesystem": "xfs", "mount": "/var/log/app",
             "nofail": True, "mount_options": "noatime"},
        ])
        self.handle(cfg)
        for dev, name in ((data, "data"), (logs, "logs")):
            st = self.status(dev)
            self.assertIsNotNone(st, dev)
            self.assertTrue(st["keygate"]["volume_id"])
            self.assertIn(name, TestSystem.opened)
        crypttab = self.read("/etc/crypttab").splitlines()
        self.assertIn("data UUID=%s none luks,_netdev" % self.uuid(data), crypttab)
        self.assertIn("logs UUID=%s none luks,_netdev,nofail" % self.uuid(logs), crypttab)
        fstab = self.read("/etc/fstab").splitlines()
        self.assertEqual(fstab[:2], ["# /etc/fstab", "UUID=1234 / ext4 defaults 0 1"])
        self.assertIn("/dev/mapper/data /data ext4 defaults,_netdev 0 2", fstab)
        self.assertIn("/dev/mapper/logs /var/log/app xfs noatime,_netdev,nofail 0 2", fstab)
        self.assertEqual(TestSystem.filesystems, {"data": "ext4", "logs": "xfs"})
        self.assertEqual(TestSystem.mounted, {"/data", "/var/log/app"})
        self.assertTrue(TestSystem.network_unlock_enabled)

        # Again (a reboot re-running it, or cloud-init single): nothing changes.
        before = {p: sha256_file(p) for p in (data, logs, self.root + "/etc/crypttab",
                                              self.root + "/etc/fstab")}
        volumes_before = self.server("volumes", "list", "--json")
        with self.assertLogs("cc_keygate", level="INFO") as logged:
            self.handle(cfg)
        self.assertEqual(before, {p: sha256_file(p) for p in before})
        self.assertEqual(volumes_before, self.server("volumes", "list", "--json"))
        self.assertEqual(sum("nothing to do" in line for line in logged.output), 2, logged.output)

        # After a reboot the mapping is closed and nothing is mounted: opened
        # and mounted again, the tables untouched.
        TestSystem.opened.clear()
        TestSystem.mounted.clear()
        self.handle(cfg)
        self.assertEqual(TestSystem.mounted, {"/data", "/var/log/app"})
        self.assertEqual(before, {p: sha256_file(p) for p in before})

    def test_a_device_with_a_file_system_is_left_untouched(self):
        used = self.volume_file("used")
        subprocess.run(["mkfs.ext4", "-q", "-F", used], check=True)
        blank = self.volume_file("blank")
        digest = sha256_file(used)
        cfg = self.config([{"device": used, "name": "used", "mount": "/used"},
                           {"device": blank, "name": "blank", "mount": "/blank"}])
        with self.assertRaises(RuntimeError) as caught:
            self.handle(cfg)
        message = str(caught.exception)
        self.assertIn(used, message)
        self.assertIn("check blank", message)
        self.assertIn("ext4", message)
        self.assertEqual(sha256_file(used), digest)
        self.assertIsNone(self.status(used))
        self.assertNotIn("used", self.read("/etc/crypttab") if os.path.exists(self.root + "/etc/crypttab") else "")
        # The other volume was done all the same.
        self.assertIsNotNone(self.status(blank))
        # With the explicit flag it is formatted.
        cfg["keygate"]["volumes"][0]["overwrite"] = True
        self.handle(cfg)
        self.assertIsNotNone(self.status(used))

    def test_enroll_existing_and_encrypt_in_place(self):
        legacy = self.volume_file("legacy")
        passphrase = os.path.join(self.root, "legacy.pass")
        with open(passphrase, "w") as f:
            f.write("legacy passphrase")
        subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", "--key-file", passphrase, legacy],
                       check=True)
        archive = self.volume_file("archive")
        subprocess.run(["mkfs.ext4", "-q", "-F", archive], check=True)
        recovery = os.path.join(self.root, "archive.recovery")
        with open(recovery, "w") as f:
            f.write("archive recovery passphrase")
        cfg = self.config([
            {"device": legacy, "name": "legacy", "mode": "enroll-existing",
             "passphrase_file": passphrase},
            {"device": archive, "name": "archive", "mode": "encrypt-in-place",
             "recovery_passphrase_file": recovery, "mount": "/srv/archive"},
        ])
        self.handle(cfg)
        for dev in (legacy, archive):
            self.assertIsNotNone(self.status(dev), dev)
        # The old passphrase still opens the legacy volume; no file system was made.
        subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", passphrase, legacy],
                       check=True)
        self.assertEqual(TestSystem.filesystems, {})
        self.assertIn("/dev/mapper/archive /srv/archive auto defaults,_netdev 0 2",
                      self.read("/etc/fstab").splitlines())
        self.assertNotIn("legacy", self.read("/etc/fstab"))

    def test_encrypt_in_place_on_a_block_device_shrinks_the_file_system_first(self):
        backing = self.volume_file("block", "64M")
        subprocess.run(["mkfs.ext4", "-q", "-F", backing], check=True)
        loop = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True, text=True)
        if loop.returncode != 0:
            self.skipTest("no loop device: " + loop.stderr.strip())
        device = loop.stdout.strip()
        try:
            recovery = os.path.join(self.root, "block.recovery")
            with open(recovery, "w") as f:
                f.write("block recovery passphrase")
            cfg = self.config([{"device": device, "name": "block", "mode": "encrypt-in-place",
                                "recovery_passphrase_file": recovery}])
            with self.assertLogs("cc_keygate", level="INFO") as logged:
                self.handle(cfg)
            self.assertIsNotNone(self.status(device))
            # The progress of the encryption is in the cloud-init log.
            self.assertTrue(any("encrypt" in line.lower() for line in logged.output), logged.output)
            # The recovery passphrase opens it too.
            subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", recovery, device],
                           check=True)
        finally:
            subprocess.run(["losetup", "-d", device], check=False)

    def test_root_moves_from_the_image_key_to_its_own(self):
        root = self.volume_file("root")
        group = os.path.join(self.root, "group.token")
        with open(group, "w") as f:
            f.write(self.token("--image-group", "--account", "123456789012", "--region", "us-east-1",
                               "--image-id", "ami-0abcdef1234567890"))
        subprocess.run([KEYGATE, "enroll", root, "--format", "--no-recovery",
                        "--no-evidence", "--server", "https://127.0.0.1:%d" % self.srv_port,
                        "--ca", self.dir + "/server/ca.pem", "--enrollment-token-file", group],
                       check=True, capture_output=True)
        image_volume = self.status(root)["keygate"]["volume_id"]
        cfg = self.config([], root={"rotate_instance_key": True, "device": root})
        self.handle(cfg)
        own = self.status(root)["keygate"]["volume_id"]
        self.assertNotEqual(own, image_volume)
        self.assertEqual(TestSystem.initramfs_refreshed, 1)
        listed = json.loads(self.server("volumes", "list", "--json"))
        policy = {v["id"]: v["policy"] for v in listed}[own]
        self.assertEqual(policy["require"]["instance_id"], "i-0123456789abcdef0")
        # One keygate keyslot: the image's is gone.
        slots = [s for s in self.status(root)["keyslots"]]
        self.assertEqual(len(slots), 1, slots)
        unlock = subprocess.run([KEYGATE, "unlock", root, "--verify-only",
                                 "--metadata-url", self.metadata_url()], capture_output=True, text=True)
        self.assertEqual(unlock.returncode, 0, unlock.stderr)
        # Again: nothing to do, no second rotation, no second initramfs.
        self.handle(cfg)
        self.assertEqual(self.status(root)["keygate"]["volume_id"], own)
        self.assertEqual(TestSystem.initramfs_refreshed, 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
