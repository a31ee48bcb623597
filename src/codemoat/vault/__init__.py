"""codemoat.vault: sealed models, machine-bound signed licenses, key leases (docs/formats.md, docs/threat-model.md).

    container.py  the .moat format: signed manifest, AES-256-GCM chunks, decrypt into a buffer or a sink
    sealer.py     writing a .moat file, streamed one chunk at a time
    machine.py    this machine's key pair and hashed hardware facts; match policies
    license.py    signed licenses, key wrapping to a machine, the offline checks
    clock.py      wall/monotonic clocks (injectable) and the authenticated clock high-water mark
    vendor.py     the vendor's keys and database (customers, sealed models); vendor_licenses.py: its licenses
    keyserver.py  the key server's lease logic (HTTP: codemoat.serve.keyserver_app)
    seats.py      a license's floating seats, one per (machine, instance), in the lease transaction
    lease.py      the customer's lease client and outbound log
    leasekeeper.py  renewing a lease in the background; when the model must go
    verify.py     `codemoat verify`

Imports from codemoat: only the shared top-level modules (errors, paths, db).
"""
