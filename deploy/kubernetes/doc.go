// Package kubernetes holds imagepipe's Kubernetes deployment: a Kustomize
// base with overlays (base/, overlays/), rendered and checked offline by
// its tests against the Kubernetes API types and KEDA's ScaledObject.
// README.md beside this file explains the choices.
package kubernetes
