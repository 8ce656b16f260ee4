package stack

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Cert is a certificate a test made for a TLS server of its own, and its
// key.
type Cert struct {
	DER  []byte
	Leaf *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// TLS is c as a server presents it.
func (c Cert) TLS() *tls.Certificate {
	return &tls.Certificate{Certificate: [][]byte{c.DER}, PrivateKey: c.Key, Leaf: c.Leaf}
}

// IssueCert makes the certificate tmpl describes, for a new P-256 key,
// signed by issuer, or by itself when issuer is nil.
func IssueCert(t testing.TB, tmpl *x509.Certificate, issuer *Cert) Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	parent, signer := tmpl, key
	if issuer != nil {
		parent, signer = issuer.Leaf, issuer.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return Cert{DER: der, Leaf: leaf, Key: key}
}

// PKI is a throwaway CA and the certificates it signs, as PEM files in
// one directory, the way a NATS or TLS configuration names them: the CA
// in ca.pem, each certificate in NAME.pem with its key in NAME-key.pem.
type PKI struct {
	Dir, CA string
	ca      Cert
	serial  int64
}

// NewPKI makes a CA, valid for an hour either side of now, in a
// directory of the test's own.
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	p := &PKI{Dir: t.TempDir(), serial: 1}
	p.ca = IssueCert(t, &x509.Certificate{
		SerialNumber: big.NewInt(p.serial), Subject: pkix.Name{CommonName: "imagepipe test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, nil)
	p.CA = filepath.Join(p.Dir, "ca.pem")
	writePEM(t, p.CA, "CERTIFICATE", p.ca.DER)
	return p
}

// Issue makes a certificate named name for localhost and 127.0.0.1,
// signed by the CA for the given uses, and returns its file and its key's.
func (p *PKI) Issue(t testing.TB, name string, usage ...x509.ExtKeyUsage) (cert, key string) {
	t.Helper()
	p.serial++
	c := IssueCert(t, &x509.Certificate{
		SerialNumber: big.NewInt(p.serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: usage,
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}, &p.ca)
	kb, err := x509.MarshalECPrivateKey(c.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, key = filepath.Join(p.Dir, name+".pem"), filepath.Join(p.Dir, name+"-key.pem")
	writePEM(t, cert, "CERTIFICATE", c.DER)
	writePEM(t, key, "EC PRIVATE KEY", kb)
	return cert, key
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
