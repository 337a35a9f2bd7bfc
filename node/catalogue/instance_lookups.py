"""Which SOP Instance UIDs the catalogue holds already, and with what bytes: the lookups
ingest makes before storing (one instance, or a batch), built once so that an instance
costs their execution, not their construction."""

from __future__ import annotations

from sqlalchemy import Table, bindparam, select

from node.catalogue.models import Instance

INSTANCES: Table = Instance.__table__  # type: ignore[assignment]

#: (sop_instance_uid, id, sha256, path) of catalogued instances; sha256 is None for one
#: filed from the ingest journal whose digest nothing has needed yet (computed from the
#: file at ``path`` when first needed)
KNOWN = select(INSTANCES.c.sop_instance_uid, INSTANCES.c.id, INSTANCES.c.sha256, INSTANCES.c.path)
KNOWN_ONE = KNOWN.where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
KNOWN_ANY = KNOWN.where(INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True)))
