// Package kubernetes holds imagepipe's Kubernetes deployment: a Kustomize
// base with overlays (base/, overlays/), rendered and checked without a
// cluster by its tests against the Kubernetes API types and the
// ScaledObject CRD of KEDA's published module. README.md beside this
// file explains the choices.
package kubernetes
