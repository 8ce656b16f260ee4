package minioserver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/imagepipe/imagepipe/internal/freeport"
)

// ClusterOptions configures a distributed MinIO on loopback: Nodes server
// processes, each with DrivesPerNode drives of its own, forming one
// erasure-coded deployment, as a MinIO tenant does across machines.
type ClusterOptions struct {
	// Options holds what every node shares. DataDir is the root: node N
	// keeps its drives in DataDir/node-N/drive-M and, with QueueEvents,
	// its own notification queue in DataDir/node-N/events. Addr and
	// ConsoleAddr are not used; each node gets a free loopback port.
	Options
	Nodes         int // default 4: erasure coding over 4 drives survives one node lost
	DrivesPerNode int // default 1
}

// Cluster is a running distributed MinIO. Any node serves any request.
type Cluster struct {
	opts  ClusterOptions
	addrs []string
	args  []string // the server arguments every node shares: all drives

	mu    sync.Mutex
	nodes []*Server
}

// StartCluster starts every node and waits until each answers
// /minio/health/cluster with 200, which MinIO does once the deployment has
// write quorum.
func StartCluster(ctx context.Context, o ClusterOptions) (*Cluster, error) {
	if o.Nodes == 0 {
		o.Nodes = 4
	}
	if o.DrivesPerNode == 0 {
		o.DrivesPerNode = 1
	}
	if o.Nodes < 2 || o.Nodes*o.DrivesPerNode < 4 {
		return nil, fmt.Errorf("start minio cluster: %d nodes of %d drives; erasure coding across nodes needs at least 2 nodes and 4 drives", o.Nodes, o.DrivesPerNode)
	}
	if err := o.check(); err != nil {
		return nil, err
	}
	root, err := filepath.Abs(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start minio cluster: %w", err)
	}
	o.DataDir = root
	c := &Cluster{opts: o, nodes: make([]*Server, o.Nodes)}
	for range o.Nodes {
		addr, err := freeport.Addr()
		if err != nil {
			return nil, err
		}
		c.addrs = append(c.addrs, addr)
	}
	// Every node is told every drive, in the same order; each finds its
	// own by its address.
	for i, addr := range c.addrs {
		for d := range o.DrivesPerNode {
			c.args = append(c.args, "http://"+addr+filepath.ToSlash(c.drive(i, d)))
		}
	}

	logs := make([]*capped, o.Nodes)
	for i := range o.Nodes {
		s, l, err := c.spawn(i)
		if err != nil {
			c.Stop()
			return nil, err
		}
		c.nodes[i], logs[i] = s, l
	}
	// The nodes wait for each other to form the deployment, so each is
	// waited for only once all run.
	for i, s := range c.nodes {
		if err := s.waitHealthy(ctx, 2*time.Minute); err != nil {
			c.Stop()
			return nil, fmt.Errorf("start minio cluster node %d on %s: %w; its output:\n%s", i+1, c.addrs[i], err, logs[i].String())
		}
	}
	return c, nil
}

func (c *Cluster) nodeDir(i int) string {
	return filepath.Join(c.opts.DataDir, "node-"+strconv.Itoa(i+1))
}

func (c *Cluster) drive(i, d int) string {
	return filepath.Join(c.nodeDir(i), "drive-"+strconv.Itoa(d+1))
}

// spawn starts node i with its own address and notification queue.
func (c *Cluster) spawn(i int) (*Server, *capped, error) {
	o := c.opts.Options
	o.Addr = c.addrs[i]
	if err := os.MkdirAll(c.nodeDir(i), 0o700); err != nil {
		return nil, nil, fmt.Errorf("start minio cluster: %w", err)
	}
	queueDir := ""
	if o.QueueEvents && o.NATSAddr != "" {
		// MinIO insists that every node has the same MINIO_* settings,
		// as nodes on machines of their own do; the same path then names
		// each node's own directory when it is relative to the node's
		// working directory, which is its node directory.
		var err error
		if queueDir, err = nodeRelativePath("events"); err != nil {
			return nil, nil, fmt.Errorf("start minio cluster: notification queues: %w", err)
		}
		if err := os.MkdirAll(filepath.Join(c.nodeDir(i), "events"), 0o700); err != nil {
			return nil, nil, fmt.Errorf("start minio cluster: %w", err)
		}
	}
	env := o.environ(queueDir)
	env = append(env,
		"MINIO_BROWSER=off",
		// MinIO refuses drives on the root file system unless told this
		// is a test deployment, and loopback drives always are.
		"MINIO_CI_CD=on",
		// Inside a container (/.dockerenv) MinIO waits for every host
		// that resolves to loopback to resolve elsewhere, as a pod's
		// DNS name eventually does; this names the node's own endpoint
		// so it can start, and the others are reached by their ports.
		"_MINIO_SERVER_LOCAL="+o.Addr,
	)
	args := append([]string{"server", "--address", o.Addr, "--quiet"}, c.args...)
	return spawn(o, c.nodeDir(i), args, env)
}

// Endpoints are the nodes' host:port addresses, node 1 first.
func (c *Cluster) Endpoints() []string { return append([]string(nil), c.addrs...) }

// Node is node i's running process (0-based), nil while it is down.
func (c *Cluster) Node(i int) *Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[i]
}

// KillNode ends node i at once with SIGKILL, as a crashed machine would;
// its drives and notification queue stay for StartNode.
func (c *Cluster) KillNode(i int) {
	c.mu.Lock()
	s := c.nodes[i]
	c.nodes[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Kill()
	}
}

// StartNode starts node i again on its address and drives and waits until
// it answers /minio/health/cluster with 200.
func (c *Cluster) StartNode(ctx context.Context, i int) error {
	if c.Node(i) != nil {
		return fmt.Errorf("minio cluster node %d is running", i+1)
	}
	var errs []error
	// The killed process's port can take a moment to be free again.
	for try := range 5 {
		if try > 0 {
			time.Sleep(500 * time.Millisecond)
		}
		s, logs, err := c.spawn(i)
		if err != nil {
			return err
		}
		if err := s.waitHealthy(ctx, 2*time.Minute); err != nil {
			s.Stop()
			errs = append(errs, fmt.Errorf("%w; its output:\n%s", err, logs.String()))
			continue
		}
		c.mu.Lock()
		c.nodes[i] = s
		c.mu.Unlock()
		return nil
	}
	return fmt.Errorf("restart minio cluster node %d on %s: %w", i+1, c.addrs[i], errors.Join(errs...))
}

// Stop stops every node that runs, all at once: a node stopped alone
// would wait for the others to answer.
func (c *Cluster) Stop() {
	var wg sync.WaitGroup
	for i := range c.nodes {
		if s := c.Node(i); s != nil {
			wg.Go(s.Stop)
		}
	}
	wg.Wait()
}
