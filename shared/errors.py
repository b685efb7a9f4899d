"""One error type for everything a user can get wrong.

The CLI prints a FedmoeError as a single line (no traceback unless --debug), so each
message names what was wrong and where.
"""


class FedmoeError(Exception):
    """A user-facing error: bad input, bad config, a mismatch. One line, says where."""


class DeltaValidationError(FedmoeError):
    """A LoRA delta failed validation (unknown module, shape, dtype, non-finite, ...)."""


class SitePolicyError(FedmoeError):
    """A message a site refuses under its own privacy policy (fedmoe.client.privacy.SitePolicy);
    the text is the one-line reason the coordinator records as that site's failure."""
