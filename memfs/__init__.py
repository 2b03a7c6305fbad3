"""memfs: a FUSE sysfs emulator for Linux memory hotplug."""

__version__ = "0.1.0"
