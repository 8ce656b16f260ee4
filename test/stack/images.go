package stack

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
)

// Kinds of upload Make builds. Every disk kind starts from the same kind of
// raw disk, so any of them can be compared with a local qemu-img convert.
const (
	KindVHDX       = "vhdx"
	KindVMDK       = "vmdk"
	KindVMDKStream = "vmdk-stream"
	KindQcow2      = "qcow2"
	KindVHD        = "vhd"
	KindVDI        = "vdi"
	KindRaw        = "raw"
	KindOVA        = "ova"
	KindQcow2Gzip  = "qcow2-gz"
	// KindBackingFile is a qcow2 that names a backing file: refused.
	KindBackingFile = "backing-file"
	// KindHuge holds more data than scratch can: a VHDX of Spec.Virtual
	// bytes whose every block names the same 8 MiB stored once, a few MiB
	// that qemu-img reads as all of the disk.
	KindHuge = "huge"
)

// MixedKinds is the rotation of convertible kinds a mixed burst cycles
// through.
var MixedKinds = []string{KindVHDX, KindVMDK, KindQcow2, KindVHD, KindVDI, KindVMDKStream, KindOVA, KindQcow2Gzip, KindRaw}

// Spec says how to build one image.
type Spec struct {
	Kind    string
	Virtual int64  // virtual size in bytes
	Data    int64  // bytes of random data written into it
	Seed    uint64 // makes the data, and so the content, unique
}

// Image is one file to upload and what imagepipe must make of it.
type Image struct {
	Key         string
	Path        string
	Spec        Spec
	Format      string // qemu-img format of the disk (inside the OVA or gzip)
	Size        int64  // bytes uploaded
	VirtualSize int64
	// Outputs maps each output key to the sha256 that a local qemu-img
	// convert gives; nil when the image must fail, or when not computed.
	Outputs map[string]string
	// Fail is the failure expected instead of outputs.
	Fail *Expect
}

// Expect describes a final failure.
type Expect struct {
	Phase    events.Phase
	Rule     string // "" when no safety rule is involved
	Contains string // a phrase the message must hold
}

var formatOf = map[string]struct{ format, ext string }{
	KindVHDX: {"vhdx", ".vhdx"}, KindVMDK: {"vmdk", ".vmdk"}, KindVMDKStream: {"vmdk", ".vmdk"},
	KindQcow2: {"qcow2", ".qcow2"}, KindVHD: {"vpc", ".vhd"}, KindVDI: {"vdi", ".vdi"}, KindRaw: {"raw", ".img"},
	KindOVA: {"vmdk", ".ova"}, KindQcow2Gzip: {"qcow2", ".qcow2.gz"},
	KindBackingFile: {"qcow2", ".qcow2"}, KindHuge: {"vhdx", ".vhdx"},
}

// Ext is the file name extension an upload of kind gets.
func Ext(kind string) string { return formatOf[kind].ext }

// Make builds the image for spec in dir, under the upload key keyBase plus
// the kind's extension. With expect set, it also converts the result
// locally to learn the sha256 each output must have.
func Make(ctx context.Context, dir, keyBase string, spec Spec, expect bool) (Image, error) {
	f, ok := formatOf[spec.Kind]
	if !ok {
		return Image{}, fmt.Errorf("unknown image kind %q", spec.Kind)
	}
	img := Image{Key: keyBase + f.ext, Spec: spec, Format: f.format, VirtualSize: spec.Virtual}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return img, err
	}
	name := strings.NewReplacer("/", "_").Replace(keyBase)
	path := filepath.Join(dir, name+f.ext)
	img.Path = path

	switch spec.Kind {
	case KindBackingFile:
		base := filepath.Join(dir, name+".base.qcow2")
		if err := qemu(ctx, "qemu-img", "create", "-q", "-f", "qcow2", base, "1M"); err != nil {
			return img, err
		}
		if err := qemu(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path, fmt.Sprint(spec.Virtual)); err != nil {
			return img, err
		}
		img.Fail = &Expect{Phase: events.PhaseInspect, Rule: events.RuleBackingFile}
		return img, img.stat()
	case KindHuge:
		err := qemu(ctx, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=8M", path, fmt.Sprint(spec.Virtual))
		if err == nil {
			err = qemu(ctx, "qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 0 4k", path)
		}
		if err == nil {
			err = aliasVHDXBlocks(path, spec.Virtual, 8<<20)
		}
		if err != nil {
			return img, err
		}
		// Data beyond the whole scratch file system: refused by rule at
		// once, never retried.
		img.Fail = &Expect{Phase: events.PhaseInspect, Rule: events.RuleScratchSpace, Contains: "more than the whole scratch file system"}
		return img, img.stat()
	}

	raw := filepath.Join(dir, name+".base.raw")
	if err := writeRaw(raw, spec); err != nil {
		return img, err
	}
	disk := path
	switch spec.Kind {
	case KindRaw:
		if err := os.Rename(raw, path); err != nil {
			return img, err
		}
	case KindOVA:
		disk = filepath.Join(dir, name+".disk1.vmdk")
		err := qemu(ctx, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, disk)
		if err == nil {
			err = writeOVA(path, "disk1.vmdk", disk)
		}
		if err != nil {
			return img, err
		}
	case KindQcow2Gzip:
		disk = filepath.Join(dir, name+".inner.qcow2")
		err := qemu(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk)
		if err == nil {
			err = gzipFile(disk, path)
		}
		if err != nil {
			return img, err
		}
	default:
		args := []string{"convert", "-f", "raw", "-O", f.format}
		if spec.Kind == KindVMDKStream {
			args = append(args, "-o", "subformat=streamOptimized")
		}
		if err := qemu(ctx, "qemu-img", append(args, raw, path)...); err != nil {
			return img, err
		}
	}
	_ = os.Remove(raw)
	if expect {
		sum, vsize, err := LocalRaw(ctx, disk, f.format, dir)
		if err != nil {
			return img, err
		}
		img.VirtualSize = vsize
		out := img.Key + ".raw"
		if spec.Kind == KindOVA {
			out = events.OVADiskKey("", img.Key, "disk1.vmdk", "raw")
		}
		img.Outputs = map[string]string{out: sum}
	}
	if disk != path {
		_ = os.Remove(disk)
	}
	return img, img.stat()
}

// aliasVHDXBlocks points every payload entry of the block table of the
// VHDX at path, which qemu-img made with blocks of block bytes and
// 512-byte sectors, at the block its first entry names.
func aliasVHDXBlocks(path string, virtual, block int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// The first region table, at 192 KiB: a 16-byte header, then 32-byte
	// entries of GUID, offset and length.
	table := make([]byte, 64<<10)
	if _, err := f.ReadAt(table, 192<<10); err != nil {
		return err
	}
	batGUID := []byte{0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08}
	le := binary.LittleEndian
	var bat int64 = -1
	for i := range int(le.Uint32(table[8:])) {
		if e := table[16+32*i:]; bytes.Equal(e[:16], batGUID) {
			bat = int64(le.Uint64(e[16:]))
		}
	}
	if bat < 0 {
		return fmt.Errorf("%s: no block table", path)
	}
	chunk := (1 << 23) * 512 / block // payload entries per sector bitmap entry
	blocks := (virtual + block - 1) / block
	entries := make([]byte, 8*(blocks+(blocks-1)/chunk))
	if _, err := f.ReadAt(entries, bat); err != nil {
		return err
	}
	for i := int64(0); i < int64(len(entries)/8); i++ {
		if (i+1)%(chunk+1) != 0 {
			copy(entries[8*i:], entries[:8])
		}
	}
	if _, err := f.WriteAt(entries, bat); err != nil {
		return err
	}
	return f.Close()
}

func (img *Image) stat() error {
	st, err := os.Stat(img.Path)
	if err != nil {
		return err
	}
	img.Size = st.Size()
	return nil
}

// MakeAll builds images in parallel, two at a time: qemu-img is CPU-bound
// and the machines this runs on are small.
func MakeAll(ctx context.Context, dir string, keys []string, specs []Spec, expect bool) ([]Image, error) {
	imgs := make([]Image, len(specs))
	errs := make([]error, len(specs))
	sem := make(chan struct{}, 2)
	var wg sync.WaitGroup
	for i := range specs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			imgs[i], errs[i] = Make(ctx, dir, keys[i], specs[i], expect)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return imgs, nil
}

// writeRaw makes a sparse raw disk of spec.Virtual bytes holding spec.Data
// bytes of seeded random data in a few extents, so that each image is
// distinct and a conversion that loses or moves data changes its sha256.
func writeRaw(path string, spec Spec) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(spec.Virtual); err != nil {
		f.Close()
		return err
	}
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[:], spec.Seed)
	rng := rand.NewChaCha8(seed)
	const extents, align = 3, 64 << 10
	per := (min(spec.Data, spec.Virtual) / extents) &^ (align - 1)
	buf := make([]byte, 1<<20)
	for i := range int64(extents) {
		if per == 0 {
			break
		}
		// Extents land in their own third of the disk, at a seeded place.
		slot := spec.Virtual / extents
		room := max(slot-per, 0)
		off := i*slot + int64(rng.Uint64()%uint64(room/align+1))*align
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return err
		}
		for left := per; left > 0; {
			n := min(left, int64(len(buf)))
			_, _ = rng.Read(buf[:n])
			if _, err := f.Write(buf[:n]); err != nil {
				f.Close()
				return err
			}
			left -= n
		}
	}
	return f.Close()
}

func writeOVA(path, diskName, disk string) error {
	body, err := os.ReadFile(disk)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(body)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range []struct {
		name string
		data []byte
	}{
		{"appliance.ovf", fmt.Appendf(nil, `<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="file1" ovf:href="%s"/></References></Envelope>`, diskName)},
		{"appliance.mf", fmt.Appendf(nil, "SHA256(%s)= %s\n", diskName, hex.EncodeToString(sum[:]))},
		{diskName, body},
	} {
		if err := tw.WriteHeader(&tar.Header{Name: m.name, Mode: 0o644, Size: int64(len(m.data)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := tw.Write(m.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o600)
}

func gzipFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	zw, _ := gzip.NewWriterLevel(out, gzip.BestSpeed)
	_, err = io.Copy(zw, in)
	if cerr := zw.Close(); err == nil {
		err = cerr
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func qemu(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// LocalRaw is what `qemu-img convert -O raw` makes of path here: its
// sha256 and size.
func LocalRaw(ctx context.Context, path, format, tmpDir string) (string, int64, error) {
	out, err := os.CreateTemp(tmpDir, "expected-*.raw")
	if err != nil {
		return "", 0, err
	}
	out.Close()
	defer os.Remove(out.Name())
	if err := qemu(ctx, "qemu-img", "convert", "-f", format, "-O", "raw", path, out.Name()); err != nil {
		return "", 0, err
	}
	return FileSHA256(out.Name())
}

// FileSHA256 hashes a file.
func FileSHA256(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	return readerSHA256(f)
}

// readerSHA256 hashes what r holds, and says how many bytes that is.
func readerSHA256(r io.Reader) (string, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

// Upload puts the image into the input bucket and returns when the upload
// completed, which is when MinIO has sent its notification.
func (s *Stack) Upload(ctx context.Context, img Image) (time.Time, error) {
	f, err := os.Open(img.Path)
	if err != nil {
		return time.Time{}, err
	}
	defer f.Close()
	_, err = s.S3.PutObject(ctx, InputBucket, img.Key, f, img.Size, minio.PutObjectOptions{ContentType: "application/octet-stream"})
	if err != nil {
		return time.Time{}, fmt.Errorf("upload %s: %w", img.Key, err)
	}
	return time.Now(), nil
}

// ObjectSHA256 downloads an object and hashes it.
func (s *Stack) ObjectSHA256(ctx context.Context, bucket, key string) (string, int64, error) {
	obj, err := s.S3.GetObject(ctx, bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return "", 0, err
	}
	defer obj.Close()
	return readerSHA256(obj)
}
