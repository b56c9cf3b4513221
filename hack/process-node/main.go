// Command process-node is the local cluster's node agent: it registers Nodes with the API
// server (virtual-kubelet's node library does the Node, Lease and Pod bookkeeping) and runs
// every container of the Pods bound to them as a local process (see README.md).
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// version is advertised as the Node's kubelet version and stamped into the build key.
const version = "v0.1.0"

type options struct {
	kubeconfig   string
	nodes        string
	kubeletPort  int
	stateDir     string
	workDir      string
	imagesFile   string
	apiHost      string
	apiPort      string
	cpu          string
	memory       string
	maxPods      string
	initialBack  time.Duration
	maxBack      time.Duration
	volumeResync time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == shimCommand {
		runShim(os.Args[2:])
		return
	}
	var o options
	flag.StringVar(&o.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the agent")
	flag.StringVar(&o.nodes, "nodes", "process-node-1,process-node-2", "comma-separated Node names to register")
	flag.IntVar(&o.kubeletPort, "kubelet-port", 16250, "port of the first Node's kubelet API on 127.0.0.1 (the next Nodes use the next ports)")
	flag.StringVar(&o.stateDir, "state-dir", "", "state directory (images.json lives here)")
	flag.StringVar(&o.workDir, "work-dir", "/var/lib/inventory-outbox/process-node", "Pod directories (volumes, logs); must be reachable by non-root users")
	flag.StringVar(&o.imagesFile, "images", "", "image mapping file (default STATE_DIR/images.json)")
	flag.StringVar(&o.apiHost, "apiserver-host", "127.0.0.1", "KUBERNETES_SERVICE_HOST given to containers")
	flag.StringVar(&o.apiPort, "apiserver-port", "", "KUBERNETES_SERVICE_PORT given to containers (default: from the kubeconfig)")
	flag.StringVar(&o.cpu, "cpu", "8", "CPU capacity advertised per Node (nominal: processes are not limited)")
	flag.StringVar(&o.memory, "memory", "16Gi", "memory capacity advertised per Node (nominal)")
	flag.StringVar(&o.maxPods, "max-pods", "110", "Pods per Node")
	flag.DurationVar(&o.initialBack, "crash-backoff", 10*time.Second, "first restart back-off after the immediate restart (doubles per crash)")
	flag.DurationVar(&o.maxBack, "crash-backoff-max", 5*time.Minute, "longest restart back-off")
	flag.DurationVar(&o.volumeResync, "volume-resync", 5*time.Second, "how often ConfigMap, Secret and token volumes are refreshed")
	flag.Parse()
	if o.stateDir == "" {
		log.Fatal("--state-dir is required")
	}
	if o.imagesFile == "" {
		o.imagesFile = filepath.Join(o.stateDir, "images.json")
	}
	if err := run(o); err != nil {
		log.Fatalf("process-node: %v", err)
	}
}

func run(o options) error {
	restCfg, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig %s: %w", o.kubeconfig, err)
	}
	restCfg.QPS, restCfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("build client: %w", err)
	}
	if o.apiPort == "" {
		u := strings.TrimPrefix(strings.TrimPrefix(restCfg.Host, "https://"), "http://")
		_, port, err := net.SplitHostPort(u)
		if err != nil {
			return fmt.Errorf("no port in API server address %q: %w", restCfg.Host, err)
		}
		o.apiPort = port
	}
	caData := restCfg.CAData
	if len(caData) == 0 && restCfg.CAFile != "" {
		if caData, err = os.ReadFile(restCfg.CAFile); err != nil {
			return fmt.Errorf("read cluster CA: %w", err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(o.workDir, "pods"), 0o755); err != nil {
		return fmt.Errorf("create work dir: %w", err)
	}
	// Every directory on the way to a volume must be traversable by a Pod's non-root user.
	for d := o.workDir; d != "/" && d != "."; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			return fmt.Errorf("make %s traversable: %w", d, err)
		}
	}
	killLeftovers(filepath.Join(o.workDir, "pods"))

	shared := &shared{
		opts:   o,
		client: client,
		self:   self,
		caData: caData,
		ips:    newIPPool(),
		tokens: newTokenCache(client),
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	cert, err := selfSignedCert()
	if err != nil {
		return err
	}
	var providers []*Provider
	errs := make(chan error, 8)
	for i, name := range strings.Split(o.nodes, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		port := o.kubeletPort + i
		var prov *Provider
		newProvider := func(cfg nodeutil.ProviderConfig) (nodeutil.Provider, node.NodeProvider, error) {
			prov = newProviderFor(name, shared)
			return prov, nil, nil
		}
		mux := http.NewServeMux()
		n, err := nodeutil.NewNode(name, newProvider,
			nodeutil.WithClient(client),
			nodeutil.AttachProviderRoutes(mux),
			nodeutil.WithTLSConfig(func(c *tls.Config) error {
				c.Certificates = []tls.Certificate{cert}
				return nil
			}),
			func(cfg *nodeutil.NodeConfig) error {
				cfg.Handler = mux
				cfg.HTTPListenAddr = fmt.Sprintf("127.0.0.1:%d", port)
				cfg.NumWorkers = 16
				// Environment variables are resolved here (status.podIP needs the Pod's address).
				cfg.SkipDownwardAPIResolution = true
				cfg.InformerResyncPeriod = 30 * time.Second
				configureNode(&cfg.NodeSpec, name, port, o)
				return nil
			},
		)
		if err != nil {
			return fmt.Errorf("create node %s: %w", name, err)
		}
		providers = append(providers, prov)
		go func() { errs <- n.Run(ctx) }()
		log.Printf("node %s: kubelet API on 127.0.0.1:%d", name, port)
	}
	select {
	case <-ctx.Done():
	case err := <-errs:
		log.Printf("a node stopped: %v", err)
	}
	// Stopping the agent stops its processes: nothing keeps running unsupervised.
	shutdownCtx, stop := context.WithTimeout(context.Background(), 15*time.Second)
	defer stop()
	for _, p := range providers {
		p.shutdown(shutdownCtx)
	}
	return nil
}

func configureNode(n *corev1.Node, name string, port int, o options) {
	n.Labels["kubernetes.io/os"] = "linux"
	n.Labels["kubernetes.io/arch"] = runtime.GOARCH
	n.Labels["kubernetes.io/hostname"] = name
	n.Labels["node.kubernetes.io/instance-type"] = "process"
	res := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse(o.cpu),
		corev1.ResourceMemory:           resource.MustParse(o.memory),
		corev1.ResourcePods:             resource.MustParse(o.maxPods),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	n.Status.Capacity = res
	n.Status.Allocatable = res.DeepCopy()
	n.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
	}
	// no Hostname address: the API server tries it first to reach the kubelet API, and the
	// Node names do not resolve
	n.Status.DaemonEndpoints = corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(port)}}
	n.Status.NodeInfo = corev1.NodeSystemInfo{
		OperatingSystem:         "linux",
		Architecture:            runtime.GOARCH,
		KubeletVersion:          "v1.37.2",
		KubeProxyVersion:        "",
		ContainerRuntimeVersion: "process://" + version,
		OSImage:                 "local processes",
		KernelVersion:           kernelVersion(),
		MachineID:               name,
		SystemUUID:              name,
		BootID:                  strconv.FormatInt(time.Now().Unix(), 10),
	}
	now := metav1.Now()
	n.Status.Conditions = []corev1.NodeCondition{
		{Type: corev1.NodeReady, Status: corev1.ConditionFalse, Reason: "KubeletNotReady", Message: "starting", LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory", LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID", LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodeNetworkUnavailable, Status: corev1.ConditionFalse, Reason: "LoopbackPodIPs", Message: "Pod IPs are loopback addresses", LastHeartbeatTime: now, LastTransitionTime: now},
	}
}

func kernelVersion() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

// selfSignedCert serves the kubelet API; the API server does not verify kubelet certificates
// here (no --kubelet-certificate-authority), as in most development clusters.
func selfSignedCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generate kubelet key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "process-node"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-sign kubelet certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
