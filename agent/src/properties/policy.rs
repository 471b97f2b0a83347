//! The policy evaluator against the rules read literally.

use super::*;

// Policies: a small vocabulary whose meaning the tests know, so an oracle can
// read the rules literally.

pub(super) const NAMESPACES: [&str; 3] = ["shop", "ops", "web"];
pub(super) const ACCOUNTS: [&str; 2] = ["a", "b"];

/// Who connects: an identity of `NAMESPACES` × `ACCOUNTS`, or plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallerGen {
    Identity(usize, usize),
    Unauthenticated,
}

impl CallerGen {
    pub(super) fn identity(self) -> Option<SpiffeId> {
        match self {
            Self::Identity(ns, sa) => {
                Some(SpiffeId::new(TD, NAMESPACES[ns], ACCOUNTS[sa]).expect("a valid id"))
            }
            Self::Unauthenticated => None,
        }
    }
}

pub(super) fn caller_of(id: Option<&SpiffeId>) -> Caller<'_> {
    id.map_or(Caller::Unauthenticated, Caller::Identity)
}

pub(super) fn callers() -> impl Strategy<Value = CallerGen> {
    prop_oneof![
        4 => (0..NAMESPACES.len(), 0..ACCOUNTS.len()).prop_map(|(n, a)| CallerGen::Identity(n, a)),
        1 => Just(CallerGen::Unauthenticated),
    ]
}

/// One source of a policy; the last four name nobody.
#[derive(Debug, Clone)]
pub(super) enum SourceGen {
    Namespace(usize),
    ServiceAccount(usize, usize),
    Identity(usize, usize),
    Unauthenticated,
    ForeignIdentity(usize, usize),
    NotUnauthenticated,
    NoKind,
    TwoKinds(usize, usize),
}

impl SourceGen {
    pub(super) fn spec(&self) -> PolicySource {
        let account = |n: usize, a: usize| format!("{}/{}", NAMESPACES[n], ACCOUNTS[a]);
        let mut source = PolicySource::default();
        match *self {
            Self::Namespace(n) => source.namespace = Some(NAMESPACES[n].to_owned()),
            Self::ServiceAccount(n, a) => source.service_account = Some(account(n, a)),
            Self::Identity(n, a) => {
                source.identity = Some(format!(
                    "spiffe://{TD}/ns/{}/sa/{}",
                    NAMESPACES[n], ACCOUNTS[a]
                ));
            }
            Self::Unauthenticated => source.unauthenticated = Some(true),
            Self::ForeignIdentity(n, a) => {
                source.identity = Some(format!(
                    "spiffe://other.domain/ns/{}/sa/{}",
                    NAMESPACES[n], ACCOUNTS[a]
                ));
            }
            Self::NotUnauthenticated => source.unauthenticated = Some(false),
            Self::NoKind => {}
            Self::TwoKinds(n, a) => {
                source.namespace = Some(NAMESPACES[n].to_owned());
                source.service_account = Some(account(n, a));
            }
        }
        source
    }

    pub(super) fn names(&self, caller: CallerGen) -> bool {
        match (self, caller) {
            (Self::Namespace(n), CallerGen::Identity(cn, _)) => *n == cn,
            (Self::ServiceAccount(n, a) | Self::Identity(n, a), CallerGen::Identity(cn, ca)) => {
                (*n, *a) == (cn, ca)
            }
            (Self::Unauthenticated, CallerGen::Unauthenticated) => true,
            _ => false,
        }
    }
}

pub(super) fn sources() -> impl Strategy<Value = SourceGen> {
    let ns = 0..NAMESPACES.len();
    let sa = 0..ACCOUNTS.len();
    prop_oneof![
        3 => ns.clone().prop_map(SourceGen::Namespace),
        3 => (ns.clone(), sa.clone()).prop_map(|(n, a)| SourceGen::ServiceAccount(n, a)),
        3 => (ns.clone(), sa.clone()).prop_map(|(n, a)| SourceGen::Identity(n, a)),
        2 => Just(SourceGen::Unauthenticated),
        1 => (ns.clone(), sa.clone()).prop_map(|(n, a)| SourceGen::ForeignIdentity(n, a)),
        1 => Just(SourceGen::NotUnauthenticated),
        1 => Just(SourceGen::NoKind),
        1 => (ns, sa).prop_map(|(n, a)| SourceGen::TwoKinds(n, a)),
    ]
}

/// Which pods of its namespace a policy selects, by their `app` label.
#[derive(Debug, Clone)]
pub(super) enum SelectorGen {
    Every,
    App(&'static str),
    HasApp,
    NoApp,
    /// `In` without values: the API server would refuse it, the agent
    /// selects the whole namespace.
    Unreadable,
}

impl SelectorGen {
    pub(super) fn spec(&self) -> Option<LabelSelector> {
        let expression = |operator| LabelSelector {
            match_expressions: vec![LabelExpression {
                key: "app".to_owned(),
                operator,
                values: Vec::new(),
            }],
            ..LabelSelector::default()
        };
        match self {
            Self::Every => None,
            Self::App(app) => Some(LabelSelector {
                match_labels: [("app".to_owned(), (*app).to_owned())].into(),
                ..LabelSelector::default()
            }),
            Self::HasApp => Some(expression(LabelOperator::Exists)),
            Self::NoApp => Some(expression(LabelOperator::DoesNotExist)),
            Self::Unreadable => Some(expression(LabelOperator::In)),
        }
    }

    pub(super) fn selects(&self, app: Option<&str>) -> bool {
        match self {
            Self::Every | Self::Unreadable => true,
            Self::App(wanted) => app == Some(*wanted),
            Self::HasApp => app.is_some(),
            Self::NoApp => app.is_none(),
        }
    }
}

pub(super) const APPS: [&str; 2] = ["db", "api"];

pub(super) fn apps() -> impl Strategy<Value = Option<&'static str>> {
    proptest::option::of(prop::sample::select(APPS.to_vec()))
}

#[derive(Debug, Clone)]
pub(super) struct PolicyGen {
    name: String,
    namespace: usize,
    selector: SelectorGen,
    /// As written, 0 (not a port) included.
    ports: Vec<u16>,
    deny: bool,
    from: Vec<SourceGen>,
}

impl PolicyGen {
    pub(super) fn key(&self) -> String {
        format!("{}/{}", NAMESPACES[self.namespace], self.name)
    }

    pub(super) fn spec(&self) -> PolicySpec {
        PolicySpec {
            name: self.name.clone(),
            namespace: NAMESPACES[self.namespace].to_owned(),
            spec: AuthorizationPolicySpec {
                selector: self.selector.spec(),
                ports: self.ports.clone(),
                action: if self.deny {
                    Action::Deny
                } else {
                    Action::Allow
                },
                from: self.from.iter().map(SourceGen::spec).collect(),
            },
        }
    }

    pub(super) fn compiled(&self) -> Arc<CompiledPolicy> {
        Arc::new(CompiledPolicy::compile(&self.spec(), TD))
    }

    pub(super) fn selects(&self, namespace: usize, app: Option<&str>) -> bool {
        self.namespace == namespace && self.selector.selects(app)
    }

    /// No ports: every port. Ports that are all 0: none.
    pub(super) fn covers(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| *p != 0 && *p == port)
    }

    pub(super) fn names(&self, caller: CallerGen) -> bool {
        self.from.iter().any(|source| source.names(caller))
    }
}

pub(super) const POLICY_PORTS: [u16; 4] = [0, 80, 443, 5432];
/// Ports connections are made to: some a policy lists, some none does.
pub(super) const PORTS: [u16; 6] = [1, 80, 443, 5432, 8080, 65535];

pub(super) fn policy() -> impl Strategy<Value = PolicyGen> {
    let selector = prop_oneof![
        3 => Just(SelectorGen::Every),
        3 => prop::sample::select(APPS.to_vec()).prop_map(SelectorGen::App),
        1 => Just(SelectorGen::HasApp),
        1 => Just(SelectorGen::NoApp),
        1 => Just(SelectorGen::Unreadable),
    ];
    (
        prop_oneof![3 => Just(0usize), 1 => 0..NAMESPACES.len()],
        selector,
        vec(prop::sample::select(POLICY_PORTS.to_vec()), 0..3),
        weighted(0.3),
        vec(sources(), 0..4),
    )
        .prop_map(|(namespace, selector, ports, deny, from)| PolicyGen {
            name: String::new(),
            namespace,
            selector,
            ports,
            deny,
            from,
        })
}

/// Policies named `p0`, `p1`, … so each has its own key.
pub(super) fn policies() -> impl Strategy<Value = Vec<PolicyGen>> {
    vec(policy(), 0..7).prop_map(|mut policies| {
        for (i, policy) in policies.iter_mut().enumerate() {
            policy.name = format!("p{i}");
        }
        policies
    })
}

pub(super) fn defaults() -> impl Strategy<Value = DefaultPolicy> {
    prop::sample::select(DefaultPolicy::ALL.to_vec())
}

pub(super) fn port() -> impl Strategy<Value = u16> {
    prop::sample::select(PORTS.to_vec())
}

pub(super) fn labels(app: Option<&str>) -> BTreeMap<String, String> {
    app.map(|app| [("app".to_owned(), app.to_owned())].into())
        .unwrap_or_default()
}

/// The verdict for `caller` on `port` of pod `pod` (of `NAMESPACES[namespace]`,
/// labelled `app`), by the module documentation's rules, scanning every policy.
pub(super) fn expected_verdict(
    policies: &[PolicyGen],
    pod: &str,
    namespace: usize,
    app: Option<&str>,
    default: DefaultPolicy,
    caller: CallerGen,
    port: u16,
) -> Verdict {
    let id = caller.identity();
    let denied = |reason| {
        Verdict::Denied(PolicyDenied {
            pod: pod.to_owned(),
            port,
            caller: caller_of(id.as_ref()).to_string(),
            reason,
        })
    };
    let applying: Vec<&PolicyGen> = policies
        .iter()
        .filter(|p| p.selects(namespace, app) && p.covers(port))
        .collect();
    // 1. A Deny that selects the pod and port and names the caller wins.
    if let Some(deny) = applying.iter().find(|p| p.deny && p.names(caller)) {
        return denied(DenyReason::DenyPolicy(deny.key()));
    }
    // 2. Else, if any Allow selects the pod and port, one must name the caller.
    let allows: Vec<&&PolicyGen> = applying.iter().filter(|p| !p.deny).collect();
    if !allows.is_empty() {
        return match allows.iter().find(|p| p.names(caller)) {
            Some(allow) => Verdict::Allowed {
                policy: Some(allow.key()),
            },
            None => denied(DenyReason::NotAllowed(
                allows.iter().take(5).map(|p| p.key()).collect(),
            )),
        };
    }
    // 3. Else the namespace's default decides.
    let admitted = match (default, caller) {
        (DefaultPolicy::AllUnauthenticated, _) => true,
        (DefaultPolicy::AllAuthenticated, caller) => caller != CallerGen::Unauthenticated,
        (DefaultPolicy::SameNamespace, CallerGen::Identity(ns, _)) => ns == namespace,
        (DefaultPolicy::SameNamespace, CallerGen::Unauthenticated) | (DefaultPolicy::Deny, _) => {
            false
        }
    };
    if admitted {
        Verdict::Allowed { policy: None }
    } else {
        denied(DenyReason::Default(default))
    }
}

pub(super) const POD: &str = "shop/db-0";

/// The pod `shop/db-0`, labelled `app`, under `policies`.
pub(super) fn pod_policies(
    policies: &[PolicyGen],
    app: Option<&str>,
    default: DefaultPolicy,
) -> PodPolicies {
    let compiled: Vec<_> = policies.iter().map(PolicyGen::compiled).collect();
    PodPolicies::select(POD.to_owned(), TD, "shop", &labels(app), default, &compiled)
}

/// What decided, without which policy did: the same whatever the order.
pub(super) fn outcome(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Allowed { policy: Some(_) } => "allowed by a policy",
        Verdict::Allowed { policy: None } => "allowed by the default",
        Verdict::Denied(denied) => denied.reason.label(),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_evaluator_is_the_three_rules_read_literally(
        policies in policies(),
        app in apps(),
        default in defaults(),
        caller in callers(),
        port in port(),
    ) {
        let id = caller.identity();
        let got = pod_policies(&policies, app, default).evaluate(caller_of(id.as_ref()), port);
        let want = expected_verdict(&policies, POD, 0, app, default, caller, port);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn a_deny_naming_the_caller_wins_over_every_allow(
        policies in policies(),
        app in apps(),
        default in defaults(),
        caller in callers(),
        port in port(),
        at in any::<prop::sample::Index>(),
        every_port in any::<bool>(),
    ) {
        let source = match caller {
            CallerGen::Identity(n, a) => SourceGen::ServiceAccount(n, a),
            CallerGen::Unauthenticated => SourceGen::Unauthenticated,
        };
        let deny = PolicyGen {
            name: "the-deny".to_owned(),
            namespace: 0,
            selector: SelectorGen::Every,
            ports: if every_port { Vec::new() } else { vec![port] },
            deny: true,
            from: vec![source],
        };
        let mut policies = policies;
        policies.insert(at.index(policies.len() + 1), deny);
        let id = caller.identity();
        let verdict = pod_policies(&policies, app, default).evaluate(caller_of(id.as_ref()), port);
        prop_assert!(
            matches!(&verdict, Verdict::Denied(PolicyDenied { reason: DenyReason::DenyPolicy(_), .. })),
            "a Deny naming {:?} on port {} did not decide: {:?}", caller, port, verdict
        );
    }

    #[test]
    fn the_verdict_does_not_depend_on_policy_order(
        (policies, shuffled) in policies().prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle())),
        app in apps(),
        default in defaults(),
        caller in callers(),
        port in port(),
    ) {
        let id = caller.identity();
        let caller = caller_of(id.as_ref());
        let before = pod_policies(&policies, app, default).evaluate(caller, port);
        let after = pod_policies(&shuffled, app, default).evaluate(caller, port);
        prop_assert_eq!(outcome(&before), outcome(&after), "{:?} vs {:?}", before, after);
    }

    #[test]
    fn the_plaintext_rule_agrees_with_the_evaluator_on_every_port(
        policies in policies(),
        app in apps(),
        default in defaults(),
    ) {
        let pod = pod_policies(&policies, app, default);
        let rule = pod.plaintext();
        for (port, let_in) in &rule.ports {
            prop_assert_ne!(*let_in, !rule.refused, "port {} is listed but agrees with the rest", port);
        }
        for port in PORTS.iter().copied().chain(rule.ports.keys().copied()) {
            let let_in = rule.ports.get(&port).copied().unwrap_or(!rule.refused);
            let verdict = pod.evaluate(Caller::Unauthenticated, port);
            prop_assert_eq!(let_in, allowed(&verdict), "port {}: {:?} vs {:?}", port, rule, verdict);
        }
    }
}
