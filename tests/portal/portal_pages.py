"""The portal's pages under AppTest, as the portal layer's tests drive them: the real entry
point, the real sign-in and registration forms, and projects moved along with the engine's
own status functions, exactly as the dispatcher would store them."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from support import ROOT, fixture_bytes
from engine import accounts, projects
from engine.accounts import Role
from engine.models import Project
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project

PASSWORD = "long enough"
USERS = {
    "ada": {Role.RESEARCHER},
    "bob": {Role.RESEARCHER},
    "vic": {Role.VOLUNTEER},
    "both": {Role.RESEARCHER, Role.VOLUNTEER},
    "root": {Role.ADMIN},
}


def app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def sign_in(at: AppTest, name: str, password: str = PASSWORD) -> AppTest:
    at.text_input[0].input(name)
    at.text_input[1].input(password)
    at.button[0].click()
    at.run()
    return at


def signed_in(name: str | None) -> AppTest:
    """A session signed in through the form. In a browser, the sign-in cookie's component
    starts the run after the one that signed in; here the test starts it."""
    at = app()
    if name is None:
        return at
    sign_in(at, name)
    assert texts(at, "success") == [f"Signed in as {name}."], texts(at, "error")
    at.run()
    assert not at.exception, at.exception
    return at


def open_page(at: AppTest, page: str, **query) -> AppTest:
    at.query_params.clear()
    for key, value in query.items():
        at.query_params[key] = str(value)
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def titles(at: AppTest) -> list[str]:
    return [t.value.split(" ", 1)[1] for t in at.title]


def texts(at: AppTest, kind: str) -> list[str]:
    # The portal escapes Markdown in messages that carry user content; read them as text.
    return [e.value.replace("\\", "") for e in getattr(at, kind)]


def submit(store, owner: str, script="square.py", rows=10, title="squares") -> int:
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(1, rows + 1))
    return projects.submit_project(store, store.settings, accounts.get_user(store, owner),
                                   title=title, script_name=script, script_bytes=fixture_bytes(script),
                                   dataset_name="d.csv", dataset_bytes=data)


def complete(store, project_id: int, fail_every: int = 0, node="node-aaaaaaaaaaaa") -> None:
    with store.session() as s:
        transition_project(s, project_id, ProjectStatus.RUNNING)
        total = s.get(Project, project_id).rows_total
        record_results(s, project_id, [
            RowResult(i, False, None, f"ValueError: row {i}", f"Traceback (most recent call last):\nrow {i}", 0.01)
            if fail_every and i % fail_every == 0 else RowResult(i, True, str((i + 1) ** 2), None, None, 0.01)
            for i in range(total)], node)


def register(at, name: str, email: str | None = None, password: str = "a good password",
             role: str | None = None):
    """Fill the registration form (fields left as None keep what they hold) and submit it."""
    at.text_input(key="reg_name").input(name)
    if email is not None:
        at.text_input(key="reg_email").input(email)
    at.text_input(key="reg_password").input(password)
    at.text_input(key="reg_repeat").input(password)
    if role is not None:
        at.radio(key="reg_role").set_value(role)
    at.button[0].click()
    return at.run()


def upload(at: AppTest, key: str, name: str, data: bytes, mime: str) -> AppTest:
    at.file_uploader(key=key).set_value((name, data, mime))
    at.run()
    assert not at.exception, at.exception
    return at


def trial_then_submit(at: AppTest) -> AppTest:
    """On the Submit page with both files uploaded: run the trial, then submit."""
    for button in ("trial_button", "run_button"):
        at.button(key=button).click()
        at.run()
    assert not at.exception, at.exception
    return at
