"""TheyChat daemons: router, router-monitor, server@TOPIC, server-monitor@TOPIC."""

__version__ = "0.1.0"
