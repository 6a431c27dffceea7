"""mllmdr-site: what a hospital site runs. Everything it reads and writes stays on site.

This file is the table of contents: each command lives in the module of its concern.
"""

from __future__ import annotations


from cli import site_federation, site_model, site_prepare, site_review
from cli.audit_cmds import audit_app
from cli.common import WorkspaceOpt, add_version_command, make_app, run_app
from cli.site_data import data_app
from cli.site_policy import policy_app

app = make_app("MLlm-DR site tools: data, features, rationales, local training and scoring.\n\n"
               "Example: mllmdr-site init --workspace /srv/mllmdr --site-id hospital-a")


def _audit_log(workspace):
    from mllm_dr.workspace import resolve_workspace

    return resolve_workspace(workspace).audit_path


COMMANDS = (site_prepare.init, site_prepare.extract, site_prepare.rationales, site_model.train, site_model.score,
            site_model.evaluate, site_review.review, site_federation.enroll, site_federation.stop,
            site_federation.status)
for command in COMMANDS:
    app.command()(command)
add_version_command(app, "mllmdr-site")
app.add_typer(data_app, name="data")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app(_audit_log, WorkspaceOpt, "mllmdr-site", "--workspace /srv/mllmdr"), name="audit")

main = run_app(app)

if __name__ == "__main__":
    main()
