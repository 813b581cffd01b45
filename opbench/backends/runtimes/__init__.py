"""Runtimes (``opbench.protocol.Runtime``) that more than one backend holds: ``threads`` (logical
devices whose streams are worker threads).  A backend is given one when it is made and
delegates to it; it never subclasses another backend to get one."""
