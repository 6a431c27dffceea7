"""Site and center policies: data files in this folder, validated by ``policies.schema``."""

from policies.schema import SitePolicy, load_policy, default_policy_path  # noqa: F401
