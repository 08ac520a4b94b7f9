"""The engine's exceptions: one base, a few specific kinds.

The portal translates these into messages in one place (``portal.errors``), the CLI
into exit codes. An exception raised by a research script is not one of these: it is
data, stored as the failed row's result.
"""


class ConstellationError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class InvalidScript(ConstellationError):
    """The uploaded script cannot be accepted (syntax, missing ``main``, size)."""

    exit_code = 2


class InvalidDataset(ConstellationError):
    """The uploaded dataset cannot be accepted (format, encoding, shape, size)."""

    exit_code = 2


class InvalidRequest(ConstellationError):
    """A request that makes no sense in the current state (e.g. cancelling a finished project)."""

    exit_code = 2


class NotFound(ConstellationError):
    """No such object, or one the acting user may not see (deliberately indistinguishable)."""

    exit_code = 3


class Forbidden(ConstellationError):
    """The acting user's role does not allow this action."""

    exit_code = 4


class ClusterUnavailable(ConstellationError):
    """The Ray cluster cannot be reached or started."""

    exit_code = 5
