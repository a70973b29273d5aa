"""Background checks that write backend state: readiness (health) and integrity, and their client."""
from sentinel_proxy.checks.client import CheckClient
from sentinel_proxy.checks.health import HealthService, block_number_of, chain_of, oldest_block_of
from sentinel_proxy.checks.integrity import IntegrityService, judge, run_inline

__all__ = ["CheckClient", "HealthService", "IntegrityService", "block_number_of", "chain_of", "judge",
           "oldest_block_of", "run_inline"]
