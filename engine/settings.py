"""The one settings object.

Every setting is declared once, as a field of ``Settings`` with its type, default and a
line of help; its environment variable is ``CONSTELLATION_<NAME>``, and the text of that
variable is read by the parser of the field's type. ``SETTINGS`` is the same declarations
as ``Setting`` records (name, type, default, environment variable, parser, help, and the
smallest value allowed where there is one), derived from the fields, never written apart.
``Settings.from_env()`` reads the environment; tests pass overrides. A value below its
minimum is refused when the object is made. docs/configuration.md lists every setting (a
test checks it).
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
    """One field of ``Settings``, as documentation and the environment see it."""

    name: str
    type: str                       # the field's annotation, e.g. "int | None"
    default: Any
    parse: Callable[[str], Any]     # environment text -> value
    help: str
    minimum: int | float | None = None  # a smaller value is refused

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


ENV_PREFIX = "CONSTELLATION_"


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


# How an environment variable's text becomes a value, by the field's declared type.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str, "int": int, "float": float, "bool": _bool, "int | None": _optional_int}


def _setting(default: Any, help: str, *, minimum: int | float | None = None) -> Any:
    """A field of ``Settings``; a value below ``minimum`` (when given) is refused at once."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True)
class Settings:
    """Every setting, declared once: its name, type, default and help.

    The environment variable is ``CONSTELLATION_<NAME>``; docs/configuration.md lists
    them all (a test checks it).
    """

    data_dir: str = _setting(
        "data", "Directory for the database, secrets and Ray's session files.")
    db_url: str = _setting(
        "", "SQLAlchemy database URL. Empty means sqlite:///<data_dir>/constellation.db.")
    ray_address: str = _setting(
        "", "Address (HOST:PORT) of an existing Ray head. Empty means a local head on ray_port, "
            "started by the engine when none is running.")
    ray_port: int = _setting(
        6380, "Port of the local Ray head (GCS).")
    confine_ray: bool = _setting(
        True, "Run the local head's Ray processes confined (engine.confinement): no data "
              "directory, no homes, read-only system, and as an unprivileged uid when started "
              "by root. Turn off only on a machine where bubblewrap cannot run.")
    head_ports: str = _setting(
        "20300-20599", "Ports (FIRST-LAST, at least 110) the local head's Ray processes and workers "
                       "listen on, so that a firewall can let volunteers' nodes reach them. Empty "
                       "means Ray's random ones.")
    node_ports: str = _setting(
        "20000-20299", "Ports (FIRST-LAST, at least 110) the join command pins a volunteer's node "
                       "to; the head and other nodes connect to them.")
    ray_num_cpus: int | None = _setting(
        None, "CPUs the local Ray head offers. Empty means all of the machine's CPUs.")
    head_host: str = _setting(
        "", "Address volunteers use to reach the head. Empty means the machine's primary address.")
    allow_unclaimed_nodes: bool = _setting(
        False, "Whether nodes whose volunteer signature does not verify may run work (they never earn credit).")
    volunteer_approval: bool = _setting(
        False, "Whether a new volunteer sees the join command (which holds the cluster token) "
               "only after an admin approves them. Off: every volunteer gets it on registering, "
               "so a fresh single machine works with the defaults. On: fewer token holders; "
               "the token still needs rotating if one leaks.")
    portal_port: int = _setting(
        8501, "Port of the Streamlit portal.")
    batch_size: int = _setting(
        100, "Rows in a project's first batches; later batches are sized from measured row "
            "time, unless the project fixes its batch size.")
    batch_seconds: float = _setting(
        1.0, "Work per batch that adaptive batching aims at, in seconds.")
    row_timeout: float = _setting(
        60.0, "Seconds one row may run before it fails.")
    import_timeout: float = _setting(
        60.0, "Seconds a research script's top-level code may run while it is imported before "
              "its project fails (the sandbox's own start is timed apart).")
    max_upload_mb: int = _setting(
        200, "Largest dataset upload, in MB (portal and engine).")
    max_script_kb: int = _setting(
        512, "Largest script upload, in KB.")
    download_link_minutes: int = _setting(
        15, "How long a download link of the Results page works, in minutes (the page renews "
            "its links every third of that).", minimum=1)
    downloads_per_account: int = _setting(
        2, "Whole-project downloads one account may run at once (each holds about a row of "
           "results in the portal's memory); more get 429.", minimum=1)
    downloads_at_once: int = _setting(
        8, "Whole-project downloads the portal runs at once, of all accounts together.", minimum=1)
    sandbox: str = _setting(
        "bwrap", "How research code is isolated: 'bwrap' (bubblewrap) or 'none' (trusted test setups only).")
    memory_limit_mb: int = _setting(
        2048, "Address-space limit of the process running research code.")
    output_limit_mb: int = _setting(
        10, "Largest JSON output of one row, in MB.")
    file_limit_mb: int = _setting(
        64, "Largest file research code may write (in its private /tmp), in MB.")
    open_files_limit: int = _setting(
        256, "Files research code may have open at once.")
    process_limit: int = _setting(
        64, "Processes and threads research code may run at once (stops fork bombs).")
    max_row_timeout: float = _setting(
        3600.0, "Admin maximum of a project's row timeout, in seconds.")
    max_memory_limit_mb: int = _setting(
        8192, "Admin maximum of a project's memory limit, in MB.")
    max_output_limit_mb: int = _setting(
        100, "Admin maximum of a project's per-row output limit, in MB.")
    project_storage_mb: int = _setting(
        256, "Most MB of results one project may store: its rows' outputs, errors and "
             "tracebacks, every replica and earlier attempt included. A batch of results "
             "that would take it further fails the project with this setting's name; what "
             "is stored stays. 256 MB holds a million rows of 100-byte outputs kept twice "
             "(a replica and the accepted result), and stops a script that returns "
             "megabytes per row after a few dozen rows. 0: no limit.")
    user_storage_mb: int = _setting(
        1024, "Most MB of results all projects of one owner may store together (counted as "
              "for project_storage_mb): four full projects, so that one researcher cannot fill "
              "the disk of a single-machine install with many projects. 0: no limit.")
    allow_unsandboxed: bool = _setting(
        False, "Whether a node where the sandbox does not work may run research code anyway (unsafe).")
    max_batch_attempts: int = _setting(
        3, "On how many different nodes a batch may fail for reasons of the node (a worker "
           "crash, a node death, code that cannot load) before its rows fail as NodeFailure.")
    quarantine_seconds: float = _setting(
        30.0, "How long a node that keeps failing batches gets no work, the first time; the "
              "period doubles while it goes on failing.")
    quarantine_max_seconds: float = _setting(
        1800.0, "The longest quarantine of a failing node, in seconds.")
    node_check_seconds: float = _setting(
        60.0, "How long the check of a node that joined may take before the node is "
              "quarantined as not answering.")
    lease_seconds: float = _setting(
        15.0, "How long a dispatcher's lease on the store lasts without renewal.")
    replication: int = _setting(
        2, "Default number of different volunteers that must agree on each row (1: no "
            "verification; results are marked unverified).")
    spot_check_rate: float = _setting(
        0.1, "Probability that a row run by a trusted volunteer is still replicated.")
    systematic_failure_rows: int = _setting(
        20, "Stop a project as failed when its first N completed rows all raised the same "
            "exception type (0 disables).")
    head_policy: str = _setting(
        "restart", "When the Ray head dies: 'restart' it (serve), or 'wait' for an operator to start one.")
    log_level: str = _setting(
        "INFO", "Log level of the entry points.")

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

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.minimum is not None and value < setting.minimum:
                raise ValueError(f"{setting.name} ({setting.env}) must be at least "
                                 f"{setting.minimum}, not {value!r}")

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
    def download_link_seconds(self) -> int:
        return self.download_link_minutes * 60

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


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f.type, f.default, _PARSERS[f.type], f.metadata["help"], f.metadata["minimum"])
    for f in dataclasses.fields(Settings))
