// Package natsserver runs an embedded NATS server with JetStream, for
// `imagepipe dev` and for tests. Production runs a real nats-server cluster.
package natsserver

import (
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options configures the embedded server.
type Options struct {
	Host     string // default 127.0.0.1
	Port     int    // -1 picks a free port
	StoreDir string // JetStream file store; survives restarts with the same dir
	Name     string
	// SyncAlways writes every JetStream message to disk before
	// acknowledging it, as the shipped server configs do. Off, the
	// server's default, it acknowledges first and flushes every two
	// minutes: the dev server and the tests lose nothing to a process
	// crash that way, only to the machine's, and run faster.
	SyncAlways bool
}

// Server is a running embedded NATS server.
type Server struct{ srv *server.Server }

// Start runs the server and waits until it accepts connections.
func Start(o Options) (*Server, error) {
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.StoreDir == "" {
		return nil, errors.New("start nats: a JetStream store dir is required")
	}
	if o.Name == "" {
		o.Name = "imagepipe-dev"
	}
	srv, err := server.NewServer(&server.Options{
		ServerName: o.Name,
		Host:       o.Host,
		Port:       o.Port,
		JetStream:  true,
		StoreDir:   o.StoreDir,
		SyncAlways: o.SyncAlways,
		NoSigs:     true, // the process owns signals, not the embedded server
		NoLog:      true,
	})
	if err != nil {
		return nil, fmt.Errorf("start nats: %w", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(15 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("start nats on %s:%d: not ready after 15s (port in use?)", o.Host, o.Port)
	}
	return &Server{srv: srv}, nil
}

// URL is the client URL, e.g. nats://127.0.0.1:4222.
func (s *Server) URL() string { return s.srv.ClientURL() }

// Addr is host:port, the form MinIO's NATS target wants.
func (s *Server) Addr() string {
	a := s.srv.Addr()
	if a == nil {
		return ""
	}
	return a.String()
}

// Shutdown stops the server and waits for it to finish.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
}
