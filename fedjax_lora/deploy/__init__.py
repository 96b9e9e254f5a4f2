"""A deployed federation: the coordinator and every hospital in its own process.

`server.run_server(workdir, transport)` runs the coordinator over any `wire.Transport`;
`site.SiteRunner.open(site_dir).handle(frame)` answers it at a site. Flower carries the
frames in a deployment (`flower_apps`, `worker`, `harness`, `python -m launch.deploy_local`),
`loopback.Loopback` in one process (tests, warm-up). `layout.lay_out` writes a deployment's
directories from a federate config. This package imports nothing at import time, so the
Flower ClientApp shim stays free of JAX.
"""
