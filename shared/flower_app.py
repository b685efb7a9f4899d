"""fedmoe's Flower app: what its app bundle (FAB) names and carries.

The coordinator writes these components into the bundle it submits
(`server/federation/coordinator.py:app_pyproject`), the repository's pyproject.toml
declares the same (`[tool.flwr.app]`, for `flwr run .` from a checkout), and every site
refuses a bundle that names anything else or carries other files
(`client/bundle_check.py`). The code itself is the installed `fedmoe` package: the two
modules a bundle may carry are for reference and must equal the site's own copies.
"""

from __future__ import annotations

SERVER_APP = "fedmoe.server.federation.server_app:app"
CLIENT_APP = "fedmoe.client.client_app:app"
COMPONENTS = {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}

# Files a fedmoe bundle may carry besides its manifest, by their path in the bundle
# (pyproject.toml's `fab-include`), with the installed module each one is a copy of.
BUNDLE_MODULES = {
    "client/client_app.py": "fedmoe.client.client_app",
    "server/federation/server_app.py": "fedmoe.server.federation.server_app",
}
# Flower's own entries: the app manifest and the bundle's list of file hashes.
MANIFEST, CONTENT_LIST = "pyproject.toml", ".info/CONTENT"
