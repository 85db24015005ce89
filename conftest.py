"""Root conftest: the project's own tests drive the plugin through pytester.

A user's project would put its artifact-fixture overrides here (see README, "Overriding
artifact fixtures"); ours need none because the reference contracts name their artifacts.
"""

pytest_plugins = ["pytester"]
