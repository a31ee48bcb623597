"""Wire formats only: request and response shapes of each compatible protocol; no I/O."""
