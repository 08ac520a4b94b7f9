"""A portal session as a browser tab holds it, without drawing the page.

`Session` speaks Streamlit's own protocol over a real websocket to a running portal
(`/_stcore/stream`): it sends the `BackMsg` protobufs the browser sends (a rerun of the
page or of one fragment, with widget values and the query string) and reads the
`ForwardMsg` stream back until the run finishes, keeping what the browser keeps (the
current page, the pages of `st.navigation`, the fragments to refresh). The server cannot
tell it from a browser; only the drawing is left out, so many sessions cost the client
little CPU.
"""

from __future__ import annotations

import asyncio

RUN_TIMEOUT = 60.0  # one script run, on a loaded machine


class Session:
    """A real Streamlit session over its own websocket, driven as the browser drives it."""

    def __init__(self, name: str, url: str):
        self.name = name
        self.url = url
        self.socket = None
        self.page = ""                           # the current page's script hash
        self.query = ""                          # the current query string
        self.pages: dict[str, str] = {}          # page title -> script hash (st.navigation)
        self.fragments: dict[str, float] = {}    # fragment id -> run_every interval
        self.problems: list[str] = []            # exceptions, errors, warnings, locks
        self.refreshes: list[float] = []         # seconds per refresh, once on its page
        self.toolbar = None                      # the toolbar mode the server configured
        self.busy = False                        # refreshing (not idle between refreshes)

    async def open(self) -> None:
        import websockets

        self.socket = await websockets.connect(self.url, subprotocols=["streamlit"],
                                               max_size=None, open_timeout=RUN_TIMEOUT)

    async def close(self) -> None:
        await self.socket.close()

    async def rerun(self, *widgets, fragment: str = ""):
        """Ask for a script run (the whole page, or one fragment) and return its elements."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        request = BackMsg()
        state = request.rerun_script
        state.query_string, state.page_script_hash = self.query, self.page
        state.fragment_id, state.is_auto_rerun = fragment, bool(fragment)
        state.widget_states.widgets.extend(widgets)
        await self.socket.send(request.SerializeToString())
        elements = []
        async with asyncio.timeout(RUN_TIMEOUT):
            while True:
                raw = await self.socket.recv()
                if b"database is locked" in raw:
                    self.problems.append(f"database is locked in a message: {raw[:300]!r}")
                message = ForwardMsg.FromString(raw)
                kind = message.WhichOneof("type")
                if kind == "delta" and message.delta.WhichOneof("type") == "new_element":
                    elements.append(self._checked(message.delta.new_element))
                elif kind == "new_session":
                    self.toolbar = message.new_session.config.toolbar_mode
                elif kind == "navigation":
                    self.pages = {p.page_name: p.page_script_hash
                                  for p in message.navigation.app_pages}
                    self.page = message.navigation.page_script_hash
                elif kind == "auto_rerun":
                    self.fragments[message.auto_rerun.fragment_id] = message.auto_rerun.interval
                elif kind == "stop_auto_rerun":
                    for fragment_id in message.stop_auto_rerun.fragment_ids:
                        self.fragments.pop(fragment_id, None)
                elif kind in ("page_not_found", "session_event"):
                    self.problems.append(f"{kind}: {getattr(message, kind)}")
                elif kind == "script_finished":
                    status = message.script_finished
                    if status == ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                        continue  # a newer run of the same request follows
                    if status == ForwardMsg.FINISHED_WITH_COMPILE_ERROR:
                        self.problems.append("the script did not compile")
                    return elements

    def _checked(self, element):
        from streamlit.proto.Alert_pb2 import Alert

        kind = element.WhichOneof("type")
        if kind == "exception":
            self.problems.append(f"exception {element.exception.type}: {element.exception.message}")
        elif kind == "alert" and element.alert.format in (Alert.ERROR, Alert.WARNING):
            self.problems.append(f"{Alert.Format.Name(element.alert.format)}: {element.alert.body}")
        return element


def widget(elements, kind: str, label: str):
    found = [getattr(e, kind) for e in elements
             if e.WhichOneof("type") == kind and getattr(e, kind).label.startswith(label)]
    assert found, f"no {kind} labelled {label!r} on the page"
    return found[0]


def value(of, **field):
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    return WidgetState(id=of.id, **field)


def alerts(elements) -> list[str]:
    return [e.alert.body for e in elements if e.WhichOneof("type") == "alert"]


async def sign_in(session: Session, name: str, password: str) -> None:
    """The first visit shows Sign in; fill the form; the next run opens the Projects page.

    (In a browser the sign-in cookie's component starts that run once the cookie is set;
    this client draws no components, so it asks for the run itself.)
    """
    await session.open()
    form = await session.rerun()
    signed = await session.rerun(value(widget(form, "text_input", "User name"), string_value=name),
                                 value(widget(form, "text_input", "Password"), string_value=password),
                                 value(widget(form, "button", "Sign in"), trigger_value=True))
    assert f"Signed in as {name}." in alerts(signed), (session.name, alerts(signed))
    await session.rerun()
    assert session.page == session.pages["Projects"], session.name
