"""Errors of the cloud plane, in the :mod:`dispatch.errors` tree.

::

    DispatchError
    └── CloudError                  the cloud or its configuration; retrying may help
        ├── CloudConfigError        clouds.yaml or DISPATCH_CLOUD_* settings are wrong
        ├── CloudApiError           the OpenStack API refused or failed a call
        ├── NoFlavorError           no flavor meets the request (names the closest ones)
        ├── QuotaError              booting more would pass a configured quota
        ├── BannedError             the flavor or image failed to boot too often lately
        ├── LockBusyError           another run of the same task holds its lock
        └── BootstrapError          SSH bootstrap of a server failed
            └── HostKeyError        the server's SSH host key is unknown or wrong

openstacksdk exceptions are translated in :mod:`workers.cloud.servers`, fabric and
paramiko ones in :mod:`workers.cloud.bootstrap`, and nowhere else.
"""

from __future__ import annotations

from dispatch.errors import DispatchError


class CloudError(DispatchError):
    """Raised when the cloud plane fails; the root of its errors."""


class CloudConfigError(CloudError):
    """Raised when clouds.yaml or a ``DISPATCH_CLOUD_*`` setting is missing or invalid."""


class CloudApiError(CloudError):
    """Raised when an OpenStack API call fails or is refused."""


class NoFlavorError(CloudError):
    """Raised when no flavor meets a request; the message names the closest flavors."""


class QuotaError(CloudError):
    """Raised when booting more servers would pass a configured quota."""


class BannedError(CloudError):
    """Raised when a flavor or image is banned after failing to boot too often."""


class LockBusyError(CloudError):
    """Raised when another run of the same task holds its lock."""


class BootstrapError(CloudError):
    """Raised when a server cannot be bootstrapped over SSH."""


class HostKeyError(BootstrapError):
    """Raised when a server's SSH host key is not the one expected."""
