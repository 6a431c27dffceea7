"""Site and center policies: data files in this folder, validated by ``policies.schema``."""

from policies.schema import SitePolicy, default_policy_path, load_policy

__all__ = ["SitePolicy", "default_policy_path", "load_policy"]
