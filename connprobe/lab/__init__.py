"""The built-in network lab: namespaces, servers and fault injectors (see topology.py for the picture)."""

from connprobe.lab.control import ControlError
from connprobe.lab.plumbing import LabError
from connprobe.lab.topology import Lab, Netns, Server, list_labs, remove_lab, remove_stale_labs

__all__ = ["ControlError", "Lab", "LabError", "Netns", "Server", "list_labs", "remove_lab", "remove_stale_labs"]
