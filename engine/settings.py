"""The one settings object.

Every setting is declared once in ``SETTINGS`` with its default, its environment
variable and a line of help. ``Settings.from_env()`` reads the environment;
tests pass overrides. The README lists every setting (a test checks it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return "CONSTELLATION_" + self.name.upper()


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "data", str,
            "Directory for the database, secrets and Ray's session files."),
    Setting("db_url", "", str,
            "SQLAlchemy database URL. Empty means sqlite:///<data_dir>/constellation.db."),
    Setting("ray_address", "", str,
            "Address (HOST:PORT) of an existing Ray head. Empty means a local head on ray_port, "
            "started by the engine when none is running."),
    Setting("ray_port", 6380, int, "Port of the local Ray head (GCS)."),
    Setting("ray_num_cpus", None, _optional_int,
            "CPUs the local Ray head offers. Empty means all of the machine's CPUs."),
    Setting("head_host", "", str,
            "Address volunteers use to reach the head. Empty means the machine's primary address."),
    Setting("allow_unclaimed_nodes", False, _bool,
            "Whether nodes whose volunteer signature does not verify may run work (they never earn credit)."),
    Setting("portal_port", 8501, int, "Port of the Streamlit portal."),
    Setting("batch_size", 100, int,
            "Rows in a project's first batches; later batches are sized from measured row "
            "time, unless the project fixes its batch size."),
    Setting("batch_seconds", 1.0, float, "Work per batch that adaptive batching aims at, in seconds."),
    Setting("row_timeout", 60.0, float, "Seconds one row may run before it fails."),
    Setting("max_upload_mb", 200, int, "Largest dataset upload, in MB (portal and engine)."),
    Setting("max_script_kb", 512, int, "Largest script upload, in KB."),
    Setting("sandbox", "bwrap", str,
            "How research code is isolated: 'bwrap' (bubblewrap) or 'none' (trusted test setups only)."),
    Setting("memory_limit_mb", 2048, int, "Address-space limit of the process running research code."),
    Setting("output_limit_mb", 10, int, "Largest JSON output of one row, in MB."),
    Setting("file_limit_mb", 64, int,
            "Largest file research code may write (in its private /tmp), in MB."),
    Setting("open_files_limit", 256, int, "Files research code may have open at once."),
    Setting("process_limit", 64, int,
            "Processes and threads research code may run at once (stops fork bombs)."),
    Setting("max_row_timeout", 3600.0, float,
            "Admin maximum of a project's row timeout, in seconds."),
    Setting("max_memory_limit_mb", 8192, int,
            "Admin maximum of a project's memory limit, in MB."),
    Setting("max_output_limit_mb", 100, int,
            "Admin maximum of a project's per-row output limit, in MB."),
    Setting("allow_unsandboxed", False, _bool,
            "Whether a node where the sandbox does not work may run research code anyway (unsafe)."),
    Setting("max_batch_attempts", 3, int,
            "How often a batch whose worker or node died is dispatched again before its rows fail."),
    Setting("lease_seconds", 15.0, float,
            "How long a dispatcher's lease on the store lasts without renewal."),
    Setting("replication", 2, int,
            "Default number of different volunteers that must agree on each row (1: no "
            "verification; results are marked unverified)."),
    Setting("spot_check_rate", 0.1, float,
            "Probability that a row run by a trusted volunteer is still replicated."),
    Setting("systematic_failure_rows", 20, int,
            "Stop a project as failed when its first N completed rows all raised the same "
            "exception type (0 disables)."),
    Setting("head_policy", "restart", str,
            "When the Ray head dies: 'restart' it (serve), or 'wait' for an operator to start one."),
    Setting("log_level", "INFO", str, "Log level of the entry points."),
)


@dataclass(frozen=True)
class Settings:
    data_dir: str = "data"
    db_url: str = ""
    ray_address: str = ""
    ray_port: int = 6380
    ray_num_cpus: int | None = None
    head_host: str = ""
    allow_unclaimed_nodes: bool = False
    portal_port: int = 8501
    batch_size: int = 100
    batch_seconds: float = 1.0
    row_timeout: float = 60.0
    max_upload_mb: int = 200
    max_script_kb: int = 512
    sandbox: str = "bwrap"
    memory_limit_mb: int = 2048
    output_limit_mb: int = 10
    file_limit_mb: int = 64
    open_files_limit: int = 256
    process_limit: int = 64
    max_row_timeout: float = 3600.0
    max_memory_limit_mb: int = 8192
    max_output_limit_mb: int = 100
    allow_unsandboxed: bool = False
    max_batch_attempts: int = 3
    lease_seconds: float = 15.0
    replication: int = 2
    spot_check_rate: float = 0.1
    systematic_failure_rows: int = 20
    head_policy: str = "restart"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``CONSTELLATION_*`` variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.env in environ:
                values[setting.name] = setting.parse(environ[setting.env])
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_path / 'constellation.db'}"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_script_bytes(self) -> int:
        return self.max_script_kb * 1024

    @property
    def reachable_host(self) -> str:
        return self.head_host or primary_address()


def primary_address() -> str:
    """The IPv4 address of the interface that holds the default route.

    Read from the kernel's tables; nothing is sent on the network.
    """
    interface = None
    try:
        with open("/proc/net/route") as routes:
            for line in routes.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    interface = fields[0]
                    break
    except OSError:
        pass
    if interface:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                packed = fcntl.ioctl(probe.fileno(), 0x8915,  # SIOCGIFADDR
                                     struct.pack("256s", interface.encode()[:15]))
            return socket.inet_ntoa(packed[20:24])
        except OSError:
            pass
    return socket.gethostbyname(socket.gethostname())


assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(Settings)], \
    "SETTINGS and Settings must declare the same settings in the same order"
