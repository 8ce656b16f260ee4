// Package config reads imagepipe's IMAGEPIPE_* environment variables into
// the configuration structs each function owns. It adds what operators
// expect of such settings and caarlos0/env alone does not give: sizes and
// durations with units (1G, 2TiB, 90d), every secret readable from a file
// (<VAR>_FILE, the convention of Docker and Kubernetes secrets), and
// errors that name the variable, its value (unless a secret) and what is
// accepted, all of them at once rather than the first.
package config
