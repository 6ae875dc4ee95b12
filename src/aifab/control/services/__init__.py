"""Services: the control plane's operations, each one small and transactional.

Routers parse and call one service; loops call services too. Services take a SQLAlchemy
session and a :class:`~aifab.control.services.auth.Principal` and raise aifab errors.
"""
