"""`python -m phatgoose_jax.cli` == the `phatgoose` command."""
import sys

from phatgoose_jax.cli import main

sys.exit(main())
