//go:build !linux

package minioserver

import "errors"

// nodeRelativePath would name a directory of each cluster node's own
// under one absolute path; only Linux's /proc/self/cwd gives one.
func nodeRelativePath(string) (string, error) {
	return "", errors.New("a notification queue of each node's own on one machine needs Linux; start the cluster without QueueEvents")
}
