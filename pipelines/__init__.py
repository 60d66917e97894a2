"""segpipe's pipeline, one package per stage: `data` -> `train` -> `inference` -> `select` -> `serve`, the
`jobs` that chain them, `weights` (the authors' released weights) and `cli` (the `segpipe` command); the
modules at the top are shared by the stages."""
