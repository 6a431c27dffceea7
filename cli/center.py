"""mllmdr-center: what the coordinating center runs. It only ever sees adapter weights and
aggregate statistics.

This file is the table of contents: each command lives in the module of its concern.
"""

from __future__ import annotations


from cli import center_run, center_service, center_simulate, center_sites
from cli.audit_cmds import audit_app
from cli.common import DirOpt, add_version_command, center_dir, make_app, run_app

app = make_app("MLlm-DR coordinating center: enrolls sites, serves the SuperLink, runs federated rounds.\n\n"
               "Example: mllmdr-center init --dir /srv/center --host 10.0.0.5")


COMMANDS = (center_sites.init, center_sites.approve, center_sites.sites, center_sites.revoke, center_sites.renew_cert,
            center_sites.fingerprint, center_service.serve, center_service.stop, center_run.run, center_run.status,
            center_simulate.simulate)
for command in COMMANDS:
    app.command()(command)
add_version_command(app, "mllmdr-center")
app.add_typer(audit_app(lambda d: center_dir(d).audit_path, DirOpt, "mllmdr-center", "--dir /srv/center"), name="audit")

main = run_app(app)

if __name__ == "__main__":
    main()
