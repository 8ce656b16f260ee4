// Package convert turns one queued upload into an image. Handle first
// plans the job from one look at its input and one at its output
// (plan.go): already done, left to an earlier delivery still running,
// refused, a copy of an earlier conversion of the same content
// (dedup.go), a server-side copy of a raw upload (rawcopy.go), or a
// conversion. A conversion downloads to a per-job scratch directory
// (download.go), inspects the upload as hostile, then takes each disk
// through check, convert, verify, store and complete (disk.go); an OVA's
// disks are stored together, all or none (ova.go). Where a disk's output
// goes is chosen before qemu-img starts: a file uploaded once verified
// (upload.go) or an NBD export uploaded while it is written (stream.go).
// Every output write completes only while the input is still the job's
// version (write.go).
//
// Each stage is a function that returns what it produced, or an error
// that names its phase and says whether a retry can help. Each job counts
// its requests to S3 and NATS and logs them in one debug line when it
// ends (requests.go).
package convert
