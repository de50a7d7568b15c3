"""mig's typed QMP schema: migration types, socket addresses, common types, commands and events."""

from mig_core.schema.common import *  # noqa: F401,F403
from mig_core.schema.migration import *  # noqa: F401,F403
from mig_core.schema.sockets import *  # noqa: F401,F403
