"""Who is asking: plugins that turn a request into a ``User`` with course roles."""

from nbexchange.identity.base import User, UserPlugin
from nbexchange.identity.jupyterhub import JupyterHubPlugin
from nbexchange.identity.users_file import UsersFilePlugin, create_demo_users_file

__all__ = ["JupyterHubPlugin", "User", "UserPlugin", "UsersFilePlugin", "create_demo_users_file"]
