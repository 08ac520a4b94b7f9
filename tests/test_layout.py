"""The shape of the code: settings documented, engine independent of the portal."""

import re
import subprocess
import sys

from conftest import ROOT
from engine.settings import SETTINGS, Settings


def test_engine_never_imports_streamlit_or_portal():
    code = "import sys, engine, engine.cli, engine.scheduler, engine.executor; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('streamlit', 'portal')]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for setting in SETTINGS:
        assert setting.env in readme, f"{setting.env} is missing from the README"
        assert re.search(rf"\b{setting.name}\b", readme), f"{setting.name} is missing from the README"


def test_environment_overrides_defaults():
    settings = Settings.from_env({"CONSTELLATION_BATCH_SIZE": "77", "CONSTELLATION_ROW_TIMEOUT": "2.5",
                                  "CONSTELLATION_DB_URL": "sqlite:////tmp/x.db",
                                  "CONSTELLATION_RAY_NUM_CPUS": ""})
    assert settings.batch_size == 77 and settings.row_timeout == 2.5
    assert settings.database_url == "sqlite:////tmp/x.db"
    assert settings.ray_num_cpus is None
    assert Settings.from_env({}).database_url.endswith("/data/constellation.db")


def test_no_catch_all_modules():
    names = {p.stem for p in (ROOT / "engine").glob("*.py")} | {p.stem for p in (ROOT / "portal").glob("*.py")}
    assert not names & {"utils", "common", "helpers", "misc"}
