"""Writers of fake manual-download folders, one module per dataset family, in each release's
exact on-disk format. The builders' tests and the ``mtl-jax data`` command-line tests both build
from them (helpers, not tests: no test module imports another)."""
