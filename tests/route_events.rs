//! Root: the route table kept from rtnetlink events equals a fresh dump after every change
//! to host routes, in a scratch network namespace (`egt-<owner>-route-events`, removed on drop).
//!
//! `cargo test --test route_events -- --include-ignored`

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_guard::inventory::kernel::{KernelChanges, watch_events};
use egress_guard::inventory::{KernelReader, RouteTable};
use egress_guard_testkit::netns::Namespace;
use ipnet::Ipv4Net;

use tokio::sync::Notify;

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "root: creates a network namespace"]
fn route_events_keep_the_table_equal_to_a_dump() {
    egress_guard_testkit::require_root();
    let netns = Namespace::new("route-events");
    let name = netns.name.clone();
    let worker = std::thread::spawn(move || {
        egress_guard_testkit::probe::enter_netns(&name);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(follow(&name));
    });
    let result = worker.join();
    drop(netns);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A step: its name, the `ip` commands it runs, and container IP -> ifindex afterwards.
type Step<'a> = (&'a str, &'a [&'a str], Vec<(std::net::Ipv4Addr, u32)>);

async fn follow(ns: &str) {
    let overlay: Ipv4Net = "10.255.0.0/16".parse().expect("literal");
    let changes = Arc::new(KernelChanges::default());
    let events = tokio::spawn(watch_events(Arc::new(Notify::new()), changes.clone()));
    let kernel = KernelReader::connect().expect("rtnetlink");
    // Let the watcher join its groups before anything changes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut table = RouteTable::default();
    assert!(
        kernel
            .refresh_routes(&mut table, &changes, false)
            .await
            .expect("first refresh"),
        "the first refresh dumps"
    );
    let ipn = |args: &str| {
        let mut full = vec!["-n", ns];
        full.extend(args.split_whitespace());
        ip(&full);
    };
    let index = |link: &str| -> u32 {
        let output = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show", "dev", link])
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&output.stdout)
            .split(':')
            .next()
            .and_then(|index| index.trim().parse().ok())
            .expect("ifindex")
    };
    ipn("link set lo up");
    for pair in ["1", "2"] {
        ipn(&format!("link add h{pair} type veth peer name c{pair}"));
        ipn(&format!("link set h{pair} up"));
        ipn(&format!("link set c{pair} up"));
    }
    let (h1, h2) = (index("h1"), index("h2"));
    let ip1 = "10.255.0.1".parse().expect("literal");
    let ip2 = "10.255.0.2".parse().expect("literal");
    let ip3 = "10.255.0.3".parse().expect("literal");

    let steps: &[Step] = &[
        ("add", &["route add 10.255.0.1/32 dev h1"], vec![(ip1, h1)]),
        (
            "replace",
            &["route replace 10.255.0.1/32 dev h2"],
            vec![(ip1, h2)],
        ),
        (
            "append through another interface (ambiguous)",
            &["route append 10.255.0.1/32 dev h1 proto static"],
            vec![],
        ),
        (
            "delete one of two",
            &["route del 10.255.0.1/32 dev h2"],
            vec![(ip1, h1)],
        ),
        (
            "silk: a peer address brings the host route",
            &["addr add 169.254.0.1 peer 10.255.0.2/32 scope link dev h2"],
            vec![(ip1, h1), (ip2, h2)],
        ),
        (
            "a host-scope route, then its interface down",
            &[
                "route add 10.255.0.3/32 dev h1 scope host",
                "link set h1 down",
            ],
            vec![(ip2, h2), (ip3, h1)],
        ),
        ("interface deleted", &["link del h1"], vec![(ip2, h2)]),
        (
            "peer address removed",
            &["addr del 169.254.0.1 peer 10.255.0.2/32 dev h2"],
            vec![],
        ),
        (
            "re-added, then the interface deleted",
            &[
                "addr add 169.254.0.1 peer 10.255.0.2/32 scope link dev h2",
                "link del h2",
            ],
            vec![],
        ),
    ];
    let started = Instant::now();
    for (name, commands, expected) in steps {
        for command in *commands {
            ipn(command);
        }
        let expected: std::collections::BTreeMap<_, _> = expected.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let dumped = kernel
                .refresh_routes(&mut table, &changes, false)
                .await
                .expect("refresh");
            assert!(!dumped, "{name}: followed from events, no dump");
            let fresh = kernel.routes(overlay).await.expect("dump");
            let matches = table.containers(overlay) == fresh
                && fresh == expected
                && table == kernel.route_table().await.expect("dump");
            if matches {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: events {:?}, dump {fresh:?}, expected {expected:?}\n{table:#?}",
                table.containers(overlay)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    events.abort();
}
