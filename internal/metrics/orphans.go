package metrics

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// orphans is the gauge of uploads that wait with no job behind them. Only
// the replica whose watchdog holds the lease counts them, so only it shows
// the series: a replica that lost the lease drops its figure rather than
// leave a stale one for max() to find.
type orphans struct {
	desc *prometheus.Desc

	mu    sync.Mutex
	n     int
	known bool
}

func (o *orphans) Describe(ch chan<- *prometheus.Desc) { ch <- o.desc }

func (o *orphans) Collect(ch chan<- prometheus.Metric) {
	o.mu.Lock()
	n, known := o.n, o.known
	o.mu.Unlock()
	if known {
		ch <- prometheus.MustNewConstMetric(o.desc, prometheus.GaugeValue, float64(n))
	}
}

func (o *orphans) record(n int, ok bool) {
	o.mu.Lock()
	o.n, o.known = n, ok
	o.mu.Unlock()
}

// OrphanRecorder returns the recorder of imagepipe_uploads_without_job,
// for the notify watchdog to report each count to (ok=false when it stops
// counting). Every call returns the same gauge's recorder.
func (m *Metrics) OrphanRecorder() func(n int, ok bool) {
	o := &orphans{desc: prometheus.NewDesc("imagepipe_uploads_without_job",
		"Uploads whose status stands still in a non-final state while the job queue holds no job for them; reconcile queues them again. Shown by the replica whose watchdog counts them.",
		nil, nil)}
	if err := m.reg.Register(o); err != nil {
		var already prometheus.AlreadyRegisteredError
		if !errors.As(err, &already) {
			panic(err) // a second metric of the same name: a programming error
		}
		o = already.ExistingCollector.(*orphans)
	}
	return o.record
}
