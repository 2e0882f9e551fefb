"""Scale-out on Ray: engine replicas as actors (replica.py), reached through a RayHost behind the same front end
as one local engine (host.py)."""
